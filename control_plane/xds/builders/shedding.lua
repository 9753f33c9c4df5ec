-- Priority shedding (control_plane/xds/builders/shedding.py). Entered only on the routes of saturated
-- models, which name this code and carry under the filter's name:
--   model        the model id (for the message)
--   level        1: shed low priority; 2: low and default (high never)
--   header       the priority header clients may send (absent when the registry does not allow it)
--   retry_after  the `retry-after` of a shed request (seconds, a string)
--   reroute_high (models with a reserve for high priority, keys on; with or without a level) see below
-- The request's class: its API key's priority (keys.lua writes it under gateway.key); without a key the
-- header's, else `default`. With a key the header can only lower the class, never raise it.
-- A shed request is answered 503 here; the local reply table (local_reply.py) makes it the gateway's
-- `model_overloaded` error, recognised by the gateway.shed metadata, which the access-log stream counts.
local RANK = { low = 1, default = 2, high = 3 }

local function class_of(handle, meta)
  local class = "default"
  local gateway = handle:streamInfo():dynamicMetadata():get("gateway")
  local key = gateway and gateway.key
  if type(key) == "table" and RANK[key.priority] then class = key.priority end
  local header = meta:get("header")
  if header then
    local asked = handle:headers():get(header)
    asked = asked and string.lower(asked)
    if asked and RANK[asked] and (type(key) ~= "table" or RANK[asked] < RANK[class]) then class = asked end
  end
  return class
end

function envoy_on_request(handle)
  local meta = handle:metadata()
  local level = meta:get("level")
  local reroute = meta:get("reroute_high")
  if not level and not reroute then return end
  local class = class_of(handle, meta)
  -- A model with a reserve for high priority (priority.py): a high key's request takes the model's
  -- high-priority route, which Envoy picks again now that the key check wrote the key's class.
  if reroute and class == "high" then return handle:clearRouteCache() end
  if not level or RANK[class] > level then return end
  local retry_after = meta:get("retry_after") or "1"
  handle:streamInfo():dynamicMetadata():set("gateway.shed", "priority", class)
  handle:respond({ [":status"] = "503", ["retry-after"] = retry_after },
    "The model `" .. tostring(meta:get("model")) .. "` is overloaded: requests of priority `" .. class ..
    "` are shed until it recovers. Retry after " .. retry_after .. " s.")
end
