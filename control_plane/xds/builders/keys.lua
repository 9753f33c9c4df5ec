-- The API-key check (tenancy): every request presents a key, Envoy accepts it by its SHA-256 alone.
-- Delivered over ECDS (builders/keys.py): the key table is data at the top of this code, so a key change
-- is an extension-config update (no listener drain, no stream cut). Keys are never in this code: only
-- their hashes. The control plane's store holds the same hashes (control_plane/tenancy).
--
-- Data lines (tab-separated): sha256, id, name, priority, models (",a,b," or "*"), expires (epoch s, 0:
-- never), denied code ("" or rate_limit_exceeded / insufficient_quota), denied until (epoch s), rpm, tpm.
-- A refusal is answered with a plain message; the local reply table (local_reply.py) makes it the
-- gateway's JSON error from the code written under KEY_NS.error.
local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local sbyte, schar, srep = string.byte, string.char, string.rep

local SHA256_K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do SHA256_K[i] = tobit(SHA256_K[i]) end
local SHA256_H = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 }
for i = 1, 8 do SHA256_H[i] = tobit(SHA256_H[i]) end
local SHA256_W = {}

local function sha256_hex(msg)
  local K, W = SHA256_K, SHA256_W
  local len = #msg
  local bitlen = len * 8
  local hi = math.floor(bitlen / 4294967296)
  local lo = bitlen % 4294967296
  -- 0x80, zero padding to 56 mod 64, then the 64-bit big-endian bit length.
  msg = msg .. "\128" .. srep("\0", (55 - len) % 64) .. schar(
    band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255),
    band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
  local h0, h1, h2, h3 = SHA256_H[1], SHA256_H[2], SHA256_H[3], SHA256_H[4]
  local h4, h5, h6, h7 = SHA256_H[5], SHA256_H[6], SHA256_H[7], SHA256_H[8]
  for i = 1, #msg, 64 do
    for j = 1, 16 do
      local p = i + (j - 1) * 4
      local b1, b2, b3, b4 = sbyte(msg, p, p + 3)
      W[j] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    for j = 17, 64 do
      local w15, w2 = W[j - 15], W[j - 2]
      local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
      local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
      W[j] = tobit(W[j - 16] + s0 + W[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for j = 1, 64 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = h + S1 + ch + K[j] + W[j]
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return tohex(h0, 8) .. tohex(h1, 8) .. tohex(h2, 8) .. tohex(h3, 8)
      .. tohex(h4, 8) .. tohex(h5, 8) .. tohex(h6, 8) .. tohex(h7, 8)
end

local KEYS = {}
for hx, id, name, prio, models, expires, denied, denied_until, rpm, tpm in string.gmatch(KEY_DATA,
    "(%x+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(%d+)\t([^\t]*)\t(%d+)\t(%d+)\t(%d+)\n") do
  local allowed = nil
  if models ~= "*" then
    allowed = {}
    for m in string.gmatch(models, "[^,]+") do allowed[m] = true end
  end
  local meta = { key_id = id, key_name = name, priority = prio }
  -- The limits, for OpenAI's x-ratelimit-* answer headers (live.lua).
  if rpm ~= "0" then meta.rpm = rpm end
  if tpm ~= "0" then meta.tpm = tpm end
  KEYS[hx] = { id = id, name = name, priority = prio, models = allowed, expires = tonumber(expires),
    denied = denied, denied_until = tonumber(denied_until), rpm = tonumber(rpm), tpm = tonumber(tpm),
    meta = meta }
end

local KEY_NS = "gateway.key"
local MAX_KEY_LENGTH = 256 -- a longer header is no key of ours: refused before any hashing

local function presented_key(headers)
  local value = headers:get("authorization")
  if value then
    local key = string.match(value, "^[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
    if key then return key end
  end
  value = headers:get("api-key") -- Azure OpenAI clients
  if value and value ~= "" then return value end
  value = headers:get("x-api-key") -- Anthropic clients
  if value and value ~= "" then return value end
  return nil
end

local function refuse(handle, status, code, message, extra)
  handle:streamInfo():dynamicMetadata():set(KEY_NS, "error", code)
  local headers = { [":status"] = status }
  if extra then for k, v in pairs(extra) do headers[k] = v end end
  handle:respond(headers, message)
end

local function check(handle)
  local headers = handle:headers()
  local key = presented_key(headers)
  if not key then
    return refuse(handle, "401", "invalid_api_key",
      "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
  end
  local record = #key <= MAX_KEY_LENGTH and KEYS[sha256_hex(key)] or nil
  local now = os.time()
  if not record or (record.expires > 0 and now >= record.expires) then
    return refuse(handle, "401", "invalid_api_key", "Incorrect API key provided, or the key was revoked or expired.")
  end
  headers:remove("authorization")
  headers:remove("api-key")
  headers:remove("x-api-key")
  -- The key, for the usage accounting (every request it made, refused ones included) and the answer.
  handle:streamInfo():dynamicMetadata():set("gateway", "key", record.meta)
  -- Model access: the model route's metadata (under this filter's name) names its model id.
  local model = handle:metadata():get("model")
  if model and record.models and not record.models[model] then
    return refuse(handle, "403", "model_not_allowed",
      "The API key `" .. record.name .. "` may not use the model `" .. model .. "`.")
  end
  if record.denied ~= "" and now < record.denied_until then
    local wait = tostring(record.denied_until - now)
    if record.denied == "insufficient_quota" then
      return refuse(handle, "429", "insufficient_quota",
        "The API key `" .. record.name .. "` has used its token budget for this period.", { ["retry-after"] = wait })
    end
    return refuse(handle, "429", "rate_limit_exceeded",
      "Rate limit reached for tokens on the API key `" .. record.name .. "`: limit " .. record.tpm ..
      " tokens per minute. Retry after " .. wait .. " s.",
      { ["retry-after"] = wait, ["x-ratelimit-limit-tokens"] = tostring(record.tpm),
        ["x-ratelimit-remaining-tokens"] = "0", ["x-ratelimit-reset-tokens"] = wait .. "s" })
  end
  -- The key's id for the request quota filter behind this one (a bucket per key), never sent upstream
  -- (the router strips it: route.py).
  headers:replace("x-gateway-key-id", record.id)
end

-- OpenAI's x-ratelimit-* answer headers are the live-state filter's (live.lua, behind this one): it knows
-- how many remain across every Envoy. This filter has no response hook, so answers do not enter it.

-- Envoy lets a request through when its Lua code fails at run time: fail closed instead.
function envoy_on_request(handle)
  local ok, err = pcall(check, handle)
  if not ok then
    handle:logErr("API key check failed: " .. tostring(err))
    handle:streamInfo():dynamicMetadata():set(KEY_NS, "error", "key_check_failed")
    handle:respond({ [":status"] = "500" }, "The gateway could not check the API key.")
  end
end
