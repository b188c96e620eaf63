-- Argo CD health of virt.libvirt-operator.io/VirtualMachine, from its status alone.
-- Rules, first match wins:
--   being deleted                                   Progressing
--   no status yet                                   Progressing  (waiting for placement)
--   Scheduled False (for this generation)           Degraded     (cannot be placed: reason)
--   the agent has not judged this generation        Progressing  (neither its Ready condition nor
--                                                                 status.observedGeneration carries it)
--   Failure True                                    Degraded     (reason: message)
--   phase Pending/Scheduled/Starting/Stopping/Terminating  Progressing
--   Ready False: RestartRequired, Drifted, HostDeviceUnavailable  Degraded (waits for the user or the host)
--   Ready True                                      Healthy      (Running, Stopped or Paused as the spec asks)
--   stopped on its own (haltedGeneration current)   Degraded     (stays stopped until the spec changes)
--   paused by the hypervisor                        Degraded
--   anything else (starting, stopping, ...)         Progressing
-- A VM paused or stopped because its spec says so is Healthy, not Suspended: it has reached
-- its declared state, and Argo CD holds a multi-wave sync open until a resource is Healthy.
-- Runs after the prelude in _common.lua (hs, generation, status, failure, ready and the helpers).

if obj.metadata.deletionTimestamp ~= nil then
  return answer("Progressing", "Being deleted")
end

if status == nil then
  return answer("Progressing", "Waiting for the controller to place the VM")
end

local scheduled = find_condition(status, "Scheduled")
if scheduled ~= nil and scheduled.status == "False" then
  if scheduled.observedGeneration ~= nil and scheduled.observedGeneration < generation then
    return answer("Progressing", "Waiting for the controller to place generation " .. generation)
  end
  return answer("Degraded", "Not scheduled: " .. explain(scheduled))
end

-- status.observedGeneration is the generation the running domain matches: it lags while a change
-- waits for a restart; the Ready condition's observedGeneration says the agent has judged the spec.
local judged = ready ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration >= generation
if not judged and (status.observedGeneration == nil or status.observedGeneration < generation) then
  local message = "Waiting for the node agent"
  if status.observedGeneration ~= nil then
    message = "Waiting for the node agent to act on generation " .. generation ..
      " (observed " .. status.observedGeneration .. ")"
  end
  if status.nodeName ~= nil then
    message = message .. " on " .. status.nodeName
  end
  return answer("Progressing", message)
end

if is_true(failure) then
  return answer("Degraded", explain(failure))
end

-- with a reason when Ready has one: "<phase>: <reason>: <message>"
local function phase_and_ready(phase)
  if ready ~= nil then
    return phase .. ": " .. explain(ready)
  end
  return phase
end

local phase = status.phase or "Unknown"
local transitional = { Pending = true, Scheduled = true, Starting = true, Stopping = true, Terminating = true }
if transitional[phase] then
  if ready ~= nil and not is_true(ready) then
    return answer("Progressing", phase_and_ready(phase))
  end
  return answer("Progressing", phase)
end

local needs_action = { RestartRequired = true, Drifted = true, HostDeviceUnavailable = true }
if ready ~= nil and not is_true(ready) and needs_action[ready.reason] then
  return answer("Degraded", explain(ready))
end

if is_true(ready) then
  if phase == "Running" and status.nodeName ~= nil then
    return answer("Healthy", "Running on " .. status.nodeName)
  elseif phase == "Running" then
    return answer("Healthy", "Running")
  end
  return answer("Healthy", phase .. " as the spec asks")
end

if status.haltedGeneration ~= nil and status.haltedGeneration == generation then
  if ready ~= nil then
    return answer("Degraded", "Stopped on its own: " .. explain(ready))
  end
  return answer("Degraded", "Stopped on its own; it stays stopped until the spec changes")
end

if ready ~= nil and ready.reason == "PausedByHypervisor" then
  return answer("Degraded", explain(ready))
end

return answer("Progressing", phase_and_ready(phase))
