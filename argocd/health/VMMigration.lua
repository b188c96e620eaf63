-- Argo CD health of virt.libvirt-operator.io/VMMigration, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Failed or Aborted, or a Failure condition True  Degraded (phase: reason: message)
--   phase Succeeded                                       Healthy
--   phase Pending / Running                               Progressing (with the progress percentage)
-- Runs after the prelude in _common.lua (hs, status, failure, ready and the helpers).

local function route()
  if status.sourceNode ~= nil and status.targetNode ~= nil then
    return " (" .. status.sourceNode .. " -> " .. status.targetNode .. ")"
  end
  return ""
end

if awaiting("Waiting for the migration to start", "observed") then
  return hs
end

if degraded({ Failed = true, Aborted = true }, status.phase .. ": ", status.phase) then
  return hs
end

if status.phase == "Succeeded" then
  return answer("Healthy", "Migration succeeded" .. route())
end

local message = status.phase .. route()
if status.progress ~= nil and status.progress.percent ~= nil then
  message = message .. ": " .. status.progress.percent .. "%"
end
return answer("Progressing", message)
