-- Argo CD health of virt.libvirt-operator.io/VMMigration, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Succeeded                                       Healthy
--   phase Failed or Aborted, or a Failure condition True  Degraded (reason: message)
--   phase Pending / Running                               Progressing (with the progress percentage)

local function find_condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function explain(c)
  local text = c.reason or "Unknown"
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local function route(status)
  if status.sourceNode ~= nil and status.targetNode ~= nil then
    return " (" .. status.sourceNode .. " -> " .. status.targetNode .. ")"
  end
  return ""
end

hs = {}
local generation = obj.metadata.generation or 1
local status = obj.status

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the migration to start"
  return hs
end

if status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. generation .. " to be observed"
  return hs
end

local failure = find_condition(status, "Failure")
local ready = find_condition(status, "Ready")
if status.phase == "Failed" or status.phase == "Aborted" or (failure ~= nil and failure.status == "True") then
  hs.status = "Degraded"
  if failure ~= nil and failure.status == "True" then
    hs.message = status.phase .. ": " .. explain(failure)
  elseif ready ~= nil then
    hs.message = status.phase .. ": " .. explain(ready)
  else
    hs.message = status.phase
  end
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Migration succeeded" .. route(status)
  return hs
end

hs.status = "Progressing"
hs.message = status.phase .. route(status)
if status.progress ~= nil and status.progress.percent ~= nil then
  hs.message = hs.message .. ": " .. status.progress.percent .. "%"
end
return hs
