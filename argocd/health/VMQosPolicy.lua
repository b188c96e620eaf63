-- Argo CD health of virt.libvirt-operator.io/VMQosPolicy, from its status alone.
--   no status yet, or observedGeneration behind          Progressing
--   phase Degraded, or a Failure condition True           Degraded (reason: message)
--   phase Active                                          Healthy (with the number of VMs it applies to)
-- Runs after the prelude in _common.lua (hs, status, failure, ready and the helpers).

if awaiting("Waiting for the policy to be applied", "applied") then
  return hs
end

if degraded({ Degraded = true }, "", "Some selected VMs could not be given the policy", true) then
  return hs
end

if status.phase == "Active" then
  if status.matchedVms ~= nil then
    return answer("Healthy", "Applied to " .. status.matchedVms .. " VM(s)")
  end
  return answer("Healthy", "Active")
end

return answer("Progressing", status.phase)
