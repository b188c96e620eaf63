-- Shared prelude of the virt.libvirt-operator.io health checks (argocd/health/_common.lua).
-- Argo CD runs each ConfigMap key as a standalone script (no require), so build_cm_patch.py puts
-- this prelude before every health/<Kind>.lua. It defines, for the kind's rules below it:
--   hs, generation, status        the result table, metadata.generation (default 1), obj.status
--   failure, ready                status's Failure and Ready conditions (nil when absent)
--   find_condition, explain, is_true, answer, awaiting, degraded

-- The condition of type `kind` in status.conditions, or nil.
local function find_condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "<reason>: <message>" of a condition ("Unknown" without a reason, no ": " without a message).
local function explain(c)
  local text = c.reason or "Unknown"
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

hs = {}
local generation = obj.metadata.generation or 1
local status = obj.status
local failure = find_condition(status, "Failure")
local ready = find_condition(status, "Ready")

-- Sets hs and returns it: `return answer("Progressing", "...")`.
local function answer(health, message)
  hs.status = health
  hs.message = message
  return hs
end

-- For a kind driven by status.phase: Progressing while there is no phase yet (`no_phase`), or while
-- status.observedGeneration is behind ("Waiting for generation N to be <verb>"). True when hs is set.
local function awaiting(no_phase, verb)
  if status == nil or status.phase == nil then
    answer("Progressing", no_phase)
    return true
  end
  if status.observedGeneration ~= nil and status.observedGeneration < generation then
    answer("Progressing", "Waiting for generation " .. generation .. " to be " .. verb)
    return true
  end
  return false
end

-- For a kind driven by status.phase: Degraded when the phase is in `failed_phases` or Failure is True.
-- The message is `prefix` and the Failure condition if True, else the Ready condition (when present,
-- and when `only_unready` is set not True), else `fallback`. True when hs is set.
local function degraded(failed_phases, prefix, fallback, only_unready)
  if not failed_phases[status.phase] and not is_true(failure) then
    return false
  end
  if is_true(failure) then
    answer("Degraded", prefix .. explain(failure))
  elseif ready ~= nil and not (only_unready and is_true(ready)) then
    answer("Degraded", prefix .. explain(ready))
  else
    answer("Degraded", fallback)
  end
  return true
end
