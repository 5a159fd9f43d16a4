-- Argo CD health check for troupe.dev Agents, Workflows, ModelProviders and Budgets
-- (the kinds share one status vocabulary). It reads the operator's conditions as kstatus does:
--   no status, or status.observedGeneration behind metadata.generation -> Progressing
--   Stalled=True (a person must act)                                   -> Degraded
--   Ready=True                                                         -> Healthy
--   anything else (the operator is still converging)                   -> Progressing
-- Argo CD runs custom checks with the base and table libraries only, so this
-- uses neither string nor math, and it type-checks every field it reads: a
-- malformed status must give a health, never a script error.
local hs = {}

local function text(value, fallback)
  if type(value) == "string" and value ~= "" then
    return value
  end
  return fallback
end

local function condition(conditions, wanted)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, found in ipairs(conditions) do
    if type(found) == "table" and found.type == wanted then
      return found
    end
  end
  return nil
end

local status = obj.status
if type(status) ~= "table" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Troupe operator to report a status"
  return hs
end

local generation = nil
if type(obj.metadata) == "table" and type(obj.metadata.generation) == "number" then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if generation ~= nil and (type(observed) ~= "number" or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Troupe operator to observe generation " .. generation
  return hs
end

local stalled = condition(status.conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = text(stalled.message, text(stalled.reason, "Stalled"))
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready.message, "Ready")
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = text(ready.message, text(ready.reason, "Not ready"))
else
  hs.message = "Waiting for the Ready condition"
end
return hs
