-- Argo CD health of virt.libvirt-operator.io/VMSnapshot, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Failed, or a Failure condition True             Degraded (reason: message)
--   phase Ready                                           Healthy
--   phase Pending / InProgress                            Progressing
-- Runs after the prelude in _common.lua (hs, status, failure, ready and the helpers).

if awaiting("Waiting for the snapshot to start", "observed") then
  return hs
end

if degraded({ Failed = true }, "", "Snapshot failed") then
  return hs
end

if status.phase == "Ready" then
  local message = "Snapshot ready"
  if status.creationTime ~= nil then
    message = message .. " (taken " .. status.creationTime .. ")"
  end
  return answer("Healthy", message)
end

if ready ~= nil and not is_true(ready) then
  return answer("Progressing", status.phase .. ": " .. explain(ready))
end
return answer("Progressing", status.phase)
