-- Argo CD health of virt.libvirt-operator.io/VMSnapshot, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Ready                                           Healthy
--   phase Failed, or a Failure condition True             Degraded (reason: message)
--   phase Pending / InProgress                            Progressing

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

hs = {}
local generation = obj.metadata.generation or 1
local status = obj.status

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the snapshot to start"
  return hs
end

if status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. generation .. " to be observed"
  return hs
end

local failure = find_condition(status, "Failure")
local ready = find_condition(status, "Ready")
if status.phase == "Failed" or (failure ~= nil and failure.status == "True") then
  hs.status = "Degraded"
  if failure ~= nil and failure.status == "True" then
    hs.message = explain(failure)
  elseif ready ~= nil then
    hs.message = explain(ready)
  else
    hs.message = "Snapshot failed"
  end
  return hs
end

if status.phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Snapshot ready"
  if status.creationTime ~= nil then
    hs.message = hs.message .. " (taken " .. status.creationTime .. ")"
  end
  return hs
end

hs.status = "Progressing"
hs.message = status.phase
if ready ~= nil and ready.status ~= "True" then
  hs.message = hs.message .. ": " .. explain(ready)
end
return hs
