-- The keys' live state (tenancy): what each ACTIVE key used in the last minute across every Envoy, and
-- the keys at their concurrency limit. Delivered over its own ECDS stream (builders/live.py), never with
-- the key table, at most about once a second: the data is a second or so old.
--
-- Every answer to a key with limits gets OpenAI's x-ratelimit-limit-*, -remaining-* and -reset-* headers
-- here (the key check, which knows the limits, writes them into `gateway.key`: rpm, tpm).
--
-- Data lines (tab-separated): key id, requests used, requests reset at (epoch s), tokens used, tokens
-- reset at (epoch s), requests in flight, and the key's concurrency limit when it is reached (else 0):
-- its new requests are refused until a later table lifts it (builders/live.py). A key absent from
-- the table used nothing lately. Limits come from the key check's metadata (`gateway.key`: rpm, tpm).
local LIVE = {}
for id, used_rq, reset_rq, used_tk, reset_tk, in_flight, blocked, tk_blocked in string.gmatch(LIVE_DATA,
    "([^\t\n]+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\n") do
  LIVE[id] = { used_rq = tonumber(used_rq), reset_rq = tonumber(reset_rq), used_tk = tonumber(used_tk),
    reset_tk = tonumber(reset_tk), in_flight = in_flight, blocked = blocked ~= "0" and blocked or nil,
    tokens_blocked = tk_blocked ~= "0" and tk_blocked or nil }
end

local floor = math.floor

-- OpenAI's duration format: "0s", "42s", "6m0s", "1h2m3s".
local function duration(s)
  if s <= 0 then return "0s" end
  if s < 60 then return s .. "s" end
  local m = floor(s / 60)
  if m < 60 then return m .. "m" .. (s % 60) .. "s" end
  return floor(m / 60) .. "h" .. (m % 60) .. "m" .. (s % 60) .. "s"
end

local function set_headers(headers, kind, limit, used, reset_at, now)
  headers:replace("x-ratelimit-limit-" .. kind, limit)
  -- The token limit's 429 (keys.lua) sets its own remaining and reset: kept.
  if headers:get("x-ratelimit-remaining-" .. kind) then return end
  local remaining = tonumber(limit) - used
  if remaining < 0 then remaining = 0 end
  headers:replace("x-ratelimit-remaining-" .. kind, tostring(remaining))
  headers:replace("x-ratelimit-reset-" .. kind, duration(reset_at - now))
end

function envoy_on_response(handle)
  local gateway = handle:streamInfo():dynamicMetadata():get("gateway")
  local key = gateway and gateway.key
  if not key or not (key.rpm or key.tpm) then return end
  local live = LIVE[key.key_id]
  local now = os.time()
  local headers = handle:headers()
  if key.rpm then
    set_headers(headers, "requests", key.rpm, live and live.used_rq or 0, live and live.reset_rq or 0, now)
  end
  if key.tpm then
    set_headers(headers, "tokens", key.tpm, live and live.used_tk or 0, live and live.reset_tk or 0, now)
  end
end
