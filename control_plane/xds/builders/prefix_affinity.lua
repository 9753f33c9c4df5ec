-- Prefix-affinity key: a short header that the route's hash policy hashes into the cluster's Maglev table
-- (prefix_affinity.py). Entered only on the routes of models with `load_balancing: prefix_affinity`.
-- The body is already buffered (buffer and json_to_metadata run first); it is searched with patterns over
-- bounded windows, never parsed, so a long resent history costs no more than a short one.
--
-- The key, first found wins:
--   1. the x-session-id request header (an explicit hint);
--   2. the body's `user` field (OpenAI's end-user id), searched in the first and last bytes of the body;
--   3. chat: the conversation's prefix, the bytes from `"messages"` through the first user message (its
--      content string, or the first text part), so every turn of a conversation gives the same key and
--      conversations sharing only a system prompt spread; a prefix longer than the window: the window;
--   4. /v1/completions (`prompt`) or TGI's `inputs`: the first PROMPT_BYTES bytes of the prompt.
-- No key: the header is removed and Maglev picks at random (still within the load bound).
-- A client's own value of the key header never counts: it is replaced or removed here. A session id over
-- HINT_BYTES is hashed on its first HINT_BYTES and not passed on to the engine.

local HEAD = 8192         -- bytes searched from the start of the body
local TAIL = 1024         -- bytes searched at its end for `user` (SDKs write it after `messages`)
local SAMPLE = 512        -- a longer prefix is hashed on its first and last SAMPLE bytes and its length
local PROMPT_BYTES = 256  -- completions: bytes of the prompt that make its key
local HINT_BYTES = 256    -- at most this much of a session id or `user` value
local KEY_HEADER = "x-gateway-prefix-key"
local SESSION_HEADER = "x-session-id"

local byte, find, format = string.byte, string.find, string.format

-- A 32-bit polynomial hash of s[i..j]: h * 1000003 + b stays below 2^53, so doubles keep it exact.
local function hash(s, i, j)
  local h = 0
  for k = i, j do
    h = (h * 1000003 + byte(s, k)) % 4294967296
  end
  return h
end

-- The key of s[i..j]: the whole range, or its two ends and its length when it is long.
local function range_key(s, i, j)
  local n = j - i + 1
  if n <= 2 * SAMPLE then
    return format("%08x-%x", hash(s, i, j), n)
  end
  return format("%08x%08x-%x", hash(s, i, i + SAMPLE - 1), hash(s, j - SAMPLE + 1, j), n)
end

-- The index of the quote closing the JSON string whose first content byte is at i; nil if not in s.
local function string_end(s, i)
  while true do
    local q = find(s, '"', i, true)
    if not q then return nil end
    local b = q - 1
    while b >= i and byte(s, b) == 92 do b = b - 1 end -- backslashes before the quote
    if (q - 1 - b) % 2 == 0 then return q end
    i = q + 1
  end
end

-- The key of a string field `"name": "..."` in s (its first HINT_BYTES bytes); nil if absent or empty.
-- Inside a JSON string every quote is escaped, so the pattern only finds keys (and `"role":"user"`, a
-- value followed by `,` or `}`, never matches).
local function field_key(s, name)
  local _, v = find(s, '"' .. name .. '"%s*:%s*"')
  if not v then return nil end
  local stop = string_end(s, v + 1)
  if not stop or stop == v + 1 then return nil end
  return range_key(s, v + 1, math.min(stop - 1, v + HINT_BYTES))
end

-- Chat: the range from `"messages"` through the first user message's content.
local function chat_key(s, truncated)
  local m = find(s, '"messages"%s*:%s*%[')
  if not m then return nil end
  local _, role = find(s, '"role"%s*:%s*"user"', m)
  if not role then
    return truncated and range_key(s, m, #s) or nil -- a system prompt longer than the window
  end
  local stop = role -- content written before the role: the range already holds it
  local _, c = find(s, '^%s*,%s*"content"%s*:%s*', role + 1)
  if c then
    local first = byte(s, c + 1)
    if first == 34 then -- a string
      stop = string_end(s, c + 2)
    elseif first == 91 then -- a list of parts: through the first text part
      local _, t = find(s, '"text"%s*:%s*"', c + 1)
      stop = t and string_end(s, t + 1)
    end
    if not stop then
      if not truncated then return nil end
      stop = #s -- the first user message runs past the window
    end
  end
  return range_key(s, m, stop)
end

-- Completions (`prompt`) and TGI (`inputs`): the prompt's first bytes.
local function prompt_key(s)
  local _, v = find(s, '"prompt"%s*:%s*')
  if not v then _, v = find(s, '"inputs"%s*:%s*') end
  if not v then return nil end
  local first = byte(s, v + 1)
  if first == 34 then
    local stop = string_end(s, v + 2) or #s
    return range_key(s, v + 1, math.min(stop, v + PROMPT_BYTES))
  elseif first == 91 then -- token ids
    local stop = find(s, "]", v + 1, true) or #s
    return range_key(s, v + 1, math.min(stop, v + PROMPT_BYTES))
  end
  return nil
end

local function body_key(handle)
  local body = handle:body()
  if not body then return nil end
  local length = body:length()
  if length == 0 then return nil end
  local truncated = length > HEAD
  local head = body:getBytes(0, truncated and HEAD or length)
  local user = field_key(head, "user")
  if not user and truncated then
    local tail_length = math.min(TAIL, length - HEAD)
    user = field_key(body:getBytes(length - tail_length, tail_length), "user")
  end
  if user then return "u:" .. user end
  local key = chat_key(head, truncated)
  if key then return "c:" .. key end
  key = prompt_key(head)
  return key and ("p:" .. key) or nil
end

function envoy_on_request(handle)
  local session = handle:headers():get(SESSION_HEADER)
  local key
  if session and session ~= "" then
    key = "s:" .. range_key(session, 1, math.min(#session, HINT_BYTES))
  else
    key = body_key(handle)
  end
  -- Fetched again: a headers object does not outlive the body() wait.
  local headers = handle:headers()
  -- A session id longer than the hint is not passed on: only its first HINT_BYTES count here, and an
  -- engine may refuse a long header line with a 400 of its own, not the gateway's error.
  if session and #session > HINT_BYTES then headers:remove(SESSION_HEADER) end
  if key then
    headers:replace(KEY_HEADER, key)
  else
    headers:remove(KEY_HEADER)
  end
end
