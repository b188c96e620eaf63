-- Argo CD health of virt.libvirt-operator.io/VirtualMachine, from its status alone.
-- Rules, first match wins:
--   being deleted                                   Progressing
--   no status yet                                   Progressing  (waiting for placement)
--   Scheduled False (for this generation)           Degraded     (cannot be placed: reason)
--   status.observedGeneration behind the spec       Progressing  (the node agent has not acted yet)
--   Failure True                                    Degraded     (reason: message)
--   phase Pending/Scheduled/Starting/Stopping/Terminating  Progressing
--   Ready True                                      Healthy      (Running, Stopped or Paused as the spec asks)
--   stopped on its own (haltedGeneration current)   Degraded     (stays stopped until the spec changes)
--   paused by the hypervisor                        Degraded
--   anything else (starting, stopping, ...)         Progressing
-- A VM paused or stopped because its spec says so is Healthy, not Suspended: it has reached
-- its declared state, and Argo CD holds a multi-wave sync open until a resource is Healthy.

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

if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Being deleted"
  return hs
end

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to place the VM"
  return hs
end

local scheduled = find_condition(status, "Scheduled")
if scheduled ~= nil and scheduled.status == "False" then
  if scheduled.observedGeneration ~= nil and scheduled.observedGeneration < generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the controller to place generation " .. generation
  else
    hs.status = "Degraded"
    hs.message = "Not scheduled: " .. explain(scheduled)
  end
  return hs
end

if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.status = "Progressing"
  if status.observedGeneration == nil then
    hs.message = "Waiting for the node agent"
  else
    hs.message = "Waiting for the node agent to act on generation " .. generation ..
      " (observed " .. status.observedGeneration .. ")"
  end
  if status.nodeName ~= nil then
    hs.message = hs.message .. " on " .. status.nodeName
  end
  return hs
end

local failure = find_condition(status, "Failure")
if failure ~= nil and failure.status == "True" then
  hs.status = "Degraded"
  hs.message = explain(failure)
  return hs
end

local phase = status.phase or "Unknown"
local ready = find_condition(status, "Ready")
local transitional = { Pending = true, Scheduled = true, Starting = true, Stopping = true, Terminating = true }
if transitional[phase] then
  hs.status = "Progressing"
  if ready ~= nil and ready.status ~= "True" then
    hs.message = phase .. ": " .. explain(ready)
  else
    hs.message = phase
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  if phase == "Running" and status.nodeName ~= nil then
    hs.message = "Running on " .. status.nodeName
  elseif phase == "Running" then
    hs.message = "Running"
  else
    hs.message = phase .. " as the spec asks"
  end
  return hs
end

if status.haltedGeneration ~= nil and status.haltedGeneration == generation then
  hs.status = "Degraded"
  if ready ~= nil then
    hs.message = "Stopped on its own: " .. explain(ready)
  else
    hs.message = "Stopped on its own; it stays stopped until the spec changes"
  end
  return hs
end

if ready ~= nil and ready.reason == "PausedByHypervisor" then
  hs.status = "Degraded"
  hs.message = explain(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = phase .. ": " .. explain(ready)
else
  hs.message = phase
end
return hs
