-- Argo CD health of virt.libvirt-operator.io/VMQosPolicy, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Degraded, or a Failure condition True           Degraded (reason: message)
--   phase Active                                          Healthy (with the number of VMs it applies to)

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
  hs.message = "Waiting for the policy to be applied"
  return hs
end

if status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. generation .. " to be applied"
  return hs
end

local failure = find_condition(status, "Failure")
local ready = find_condition(status, "Ready")
if status.phase == "Degraded" or (failure ~= nil and failure.status == "True") then
  hs.status = "Degraded"
  if failure ~= nil and failure.status == "True" then
    hs.message = explain(failure)
  elseif ready ~= nil and ready.status ~= "True" then
    hs.message = explain(ready)
  else
    hs.message = "Some selected VMs could not be given the policy"
  end
  return hs
end

if status.phase == "Active" then
  hs.status = "Healthy"
  if status.matchedVms ~= nil then
    hs.message = "Applied to " .. status.matchedVms .. " VM(s)"
  else
    hs.message = "Active"
  end
  return hs
end

hs.status = "Progressing"
hs.message = status.phase
return hs
