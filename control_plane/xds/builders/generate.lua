-- POST /v1/generate (the seeds' API) translated to and from the engine's /v1/chat/completions, and the
-- engine's own model name (served_model) put in `model` of every OpenAI request. Runs inside Envoy.
-- Per-model data comes from the route's metadata under this filter's name (see generate.py):
--   id, engine, served_model (optional), scenarios = {name = {system?, user}}.
-- LuaJIT has no JSON library: a small decoder and encoder follow.

local NULL = {}

local function decode(s)
  local pos = 1
  local top_model = nil -- {start, stop} of the top-level "model" value, for an in-place rewrite
  local value

  local function ws()
    pos = string.find(s, "[^ \t\r\n]", pos) or (#s + 1)
  end

  local function err(what)
    error({json = what .. " at byte " .. pos}, 0)
  end

  local escapes = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" }

  local function utf8(cp)
    if cp < 0x80 then return string.char(cp) end
    if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
    if cp < 0x10000 then
      return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return string.char(0xF0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
      0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
  end

  local function str()
    pos = pos + 1
    local parts = {}
    while true do
      local a = string.find(s, '["\\]', pos)
      if not a then err("unterminated string") end
      parts[#parts + 1] = string.sub(s, pos, a - 1)
      if string.sub(s, a, a) == '"' then
        pos = a + 1
        return table.concat(parts)
      end
      local c = string.sub(s, a + 1, a + 1)
      if c == "u" then
        local cp = tonumber(string.sub(s, a + 2, a + 5), 16)
        if not cp then err("bad \\u escape") end
        pos = a + 6
        if cp >= 0xD800 and cp < 0xDC00 and string.sub(s, pos, pos + 1) == "\\u" then
          local lo = tonumber(string.sub(s, pos + 2, pos + 5), 16)
          if lo and lo >= 0xDC00 and lo < 0xE000 then
            cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
            pos = pos + 6
          end
        end
        parts[#parts + 1] = utf8(cp)
      else
        local e = escapes[c]
        if not e then err("bad escape") end
        parts[#parts + 1] = e
        pos = a + 2
      end
    end
  end

  function value(depth)
    if depth > 64 then err("nested too deeply") end
    ws()
    local c = string.sub(s, pos, pos)
    if c == "{" then
      local obj = {}
      pos = pos + 1
      ws()
      if string.sub(s, pos, pos) == "}" then pos = pos + 1 return obj end
      while true do
        ws()
        if string.sub(s, pos, pos) ~= '"' then err("expected a key") end
        local k = str()
        ws()
        if string.sub(s, pos, pos) ~= ":" then err("expected ':'") end
        pos = pos + 1
        ws()
        local start = pos
        obj[k] = value(depth + 1)
        if depth == 0 and k == "model" then top_model = { start, pos - 1 } end
        ws()
        c = string.sub(s, pos, pos)
        pos = pos + 1
        if c == "}" then return obj end
        if c ~= "," then err("expected ',' or '}'") end
      end
    elseif c == "[" then
      local arr = { __array = true }
      pos = pos + 1
      ws()
      if string.sub(s, pos, pos) == "]" then pos = pos + 1 return arr end
      while true do
        arr[#arr + 1] = value(depth + 1)
        ws()
        c = string.sub(s, pos, pos)
        pos = pos + 1
        if c == "]" then return arr end
        if c ~= "," then err("expected ',' or ']'") end
      end
    elseif c == '"' then
      return str()
    elseif string.sub(s, pos, pos + 3) == "true" then
      pos = pos + 4 return true
    elseif string.sub(s, pos, pos + 4) == "false" then
      pos = pos + 5 return false
    elseif string.sub(s, pos, pos + 3) == "null" then
      pos = pos + 4 return NULL
    end
    local num = string.match(s, "^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
    if not num or num == "" or not tonumber(num) then err("unexpected character") end
    pos = pos + #num
    return tonumber(num)
  end

  local ok, result = pcall(function()
    local v = value(0)
    ws()
    if pos <= #s then err("trailing data") end
    return v
  end)
  if not ok then
    -- Whatever went wrong (even out of memory on a hostile body), it is a body we cannot read.
    return nil, type(result) == "table" and result.json or "malformed JSON"
  end
  return result, nil, top_model
end

local encode

local function encode_string(v)
  return '"' .. string.gsub(v, '[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

function encode(v)
  local t = type(v)
  if v == NULL or v == nil then return "null" end
  if t == "string" then return encode_string(v) end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format("%d", v) end
    return string.format("%.17g", v)
  end
  local parts = {}
  if v.__array then
    for i = 1, #v do parts[i] = encode(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do if k ~= "__array" then keys[#keys + 1] = k end end
  table.sort(keys)
  for i, k in ipairs(keys) do parts[i] = encode_string(k) .. ":" .. encode(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function fill(template, inputs)
  local out, from = {}, 1
  while true do
    local a, b = string.find(template, "{inputs}", from, true)
    if not a then break end
    out[#out + 1] = string.sub(template, from, a - 1)
    out[#out + 1] = inputs
    from = b + 1
  end
  out[#out + 1] = string.sub(template, from)
  return table.concat(out)
end

local NS = "gateway.generate"
local TOP_KEYS = { model_id = true, inputs = true, scenario = true, parameters = true, stream = true }
-- parameter -> chat completions field; repetition_penalty only where the engine's chat API takes it.
local PARAMS = { max_new_tokens = "max_tokens", temperature = "temperature", top_p = "top_p", stop = "stop",
  seed = "seed", repetition_penalty = "repetition_penalty" }
local NO_REPETITION_PENALTY = { tgi = true }

local function reject(handle, message)
  -- A local reply: the listener's reply mapper wraps it in the gateway's OpenAI-style error JSON.
  handle:respond({ [":status"] = "400", ["content-type"] = "text/plain" }, message)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function whole_body(handle)
  local body = handle:body()
  if not body then return "" end
  return body:getBytes(0, body:length())
end

local function set_body(handle, text)
  handle:body():setBytes(text)
  handle:headers():replace("content-length", tostring(#text))
end

local function generate_request(handle, meta)
  local req, why = decode(whole_body(handle))
  if type(req) ~= "table" or req.__array then
    return reject(handle, "The body must be a JSON object" .. (why and (": " .. why) or "") .. ".")
  end
  for _, k in ipairs(sorted_keys(req)) do
    if not TOP_KEYS[k] then
      return reject(handle, "Unknown field `" .. k .. "`: /v1/generate takes model_id, inputs, scenario, "
        .. "parameters and stream.")
    end
  end
  if type(req.inputs) ~= "string" or req.inputs == "" then
    return reject(handle, "`inputs` is required: the text to generate from, as a non-empty string.")
  end
  local scenarios = meta.scenarios or {}
  local scenario = nil
  if req.scenario ~= nil and req.scenario ~= NULL then
    scenario = type(req.scenario) == "string" and scenarios[req.scenario] or nil
    if not scenario then
      return reject(handle, "Unknown scenario `" .. tostring(req.scenario) .. "`. Known scenarios: "
        .. table.concat(sorted_keys(scenarios), ", ") .. ".")
    end
  end
  local out = { model = meta.served_model or meta.id }
  local params = req.parameters
  if params ~= nil and params ~= NULL then
    if type(params) ~= "table" or params.__array then
      return reject(handle, "`parameters` must be a JSON object.")
    end
    for _, k in ipairs(sorted_keys(params)) do
      local field = PARAMS[k]
      if not field then
        return reject(handle, "Unknown parameter `" .. k .. "`. Known parameters: "
          .. table.concat(sorted_keys(PARAMS), ", ") .. ".")
      end
      if k == "repetition_penalty" and NO_REPETITION_PENALTY[meta.engine] then
        return reject(handle, "The parameter `repetition_penalty` is not supported by this model's engine ("
          .. meta.engine .. ") on its chat API.")
      end
      if params[k] ~= NULL then out[field] = params[k] end
    end
  end
  local messages = { __array = true }
  if scenario and scenario.system then
    messages[1] = { role = "system", content = scenario.system }
  end
  local user = scenario and scenario.user or "{inputs}"
  messages[#messages + 1] = { role = "user", content = fill(user, req.inputs) }
  out.messages = messages
  local stream = req.stream == true
  if stream then
    out.stream = true
    out.stream_options = { include_usage = true }
  end
  set_body(handle, encode(out))
  handle:headers():replace(":path", "/v1/chat/completions")
  handle:headers():replace("content-type", "application/json")
  local info = handle:streamInfo():dynamicMetadata()
  info:set(NS, "stream", stream)
  info:set(NS, "scenario", scenario and req.scenario or "none")
end

local function rename_model(handle, served)
  local text = whole_body(handle)
  local _, _, span = decode(text)
  if span and string.sub(text, span[1], span[1]) == '"' then
    set_body(handle, string.sub(text, 1, span[1] - 1) .. encode_string(served) .. string.sub(text, span[2] + 1))
  end
end

-- The same code serves two filters (generate.py): the generate filter, which Envoy enters only for
-- /v1/generate, and the rename filter (RENAME_ONLY set), entered only on the routes of models that set
-- served_model, with that name in the route's metadata under the rename filter's name.
if RENAME_ONLY then
  function envoy_on_request(handle)
    -- /v1/generate was translated by the generate filter, which wrote the served name already.
    if handle:streamInfo():dynamicMetadata():get(NS) then return end
    local served = handle:metadata():get("served_model")
    -- Any path: a body without a top-level string `model` (TGI's /generate, TEI's /embed) is left alone.
    if served then rename_model(handle, served) end
  end
else
  function envoy_on_request(handle)
    local meta = handle:metadata()
    local id = meta:get("id")
    if not id then return end -- not a model route: Envoy answers it itself
    local path = handle:headers():get(":path")
    if path ~= "/v1/generate" and string.sub(path, 1, 13) ~= "/v1/generate?" then return end
    return generate_request(handle, { id = id, engine = meta:get("engine"),
      served_model = meta:get("served_model"), scenarios = meta:get("scenarios") })
  end
end

local function generated(resp)
  local choice = (resp.choices or {})[1] or {}
  local message = choice.message or {}
  local usage = resp.usage
  if type(usage) ~= "table" then usage = {} end
  return {
    generated_text = type(message.content) == "string" and message.content or "",
    model = resp.model,
    tokens = usage.completion_tokens or 0,
    finish_reason = choice.finish_reason or NULL,
    usage = resp.usage or NULL,
  }
end

-- The answer's token counts and finish reason as dynamic metadata, read by the access-log stream that
-- counts /v1/generate per model and scenario (control_plane/xds/generate_log.py).
local function record_usage(handle, usage, finish)
  local info = handle:streamInfo():dynamicMetadata()
  if type(usage) == "table" then
    if type(usage.prompt_tokens) == "number" then info:set(NS, "prompt_tokens", usage.prompt_tokens) end
    if type(usage.completion_tokens) == "number" then
      info:set(NS, "completion_tokens", usage.completion_tokens)
    end
  end
  if type(finish) == "string" then info:set(NS, "finish_reason", finish) end
end

local function stream_response(handle)
  local pending, text, finish, model, usage = "", {}, NULL, NULL, NULL
  for chunk in handle:bodyChunks() do
    pending = pending .. chunk:getBytes(0, chunk:length())
    local out = {}
    while true do
      local a, b = string.find(pending, "\r?\n\r?\n")
      if not a then break end
      local event = string.sub(pending, 1, a - 1)
      pending = string.sub(pending, b + 1)
      local data = string.match(event, "^data: ?(.*)$")
      if data == "[DONE]" then
        local final = { generated_text = table.concat(text), model = model, tokens = NULL,
          finish_reason = finish, usage = usage }
        if type(usage) == "table" then final.tokens = usage.completion_tokens or NULL end
        record_usage(handle, usage, finish)
        out[#out + 1] = "data: " .. encode(final) .. "\n\ndata: [DONE]\n\n"
      elseif data then
        local obj = decode(data)
        if type(obj) == "table" then
          if obj.model then model = obj.model end
          if type(obj.usage) == "table" then usage = obj.usage end
          local choice = (obj.choices or {})[1]
          if choice then
            local delta = choice.delta or {}
            if choice.finish_reason and choice.finish_reason ~= NULL then finish = choice.finish_reason end
            if type(delta.content) == "string" and delta.content ~= "" then
              text[#text + 1] = delta.content
              out[#out + 1] = "data: " .. encode({ text = delta.content }) .. "\n\n"
            end
          elseif obj.error then
            out[#out + 1] = event .. "\n\n"
          end
        else
          out[#out + 1] = event .. "\n\n"
        end
      end
    end
    chunk:setBytes(table.concat(out))
  end
end

if not RENAME_ONLY then
  function envoy_on_response(handle)
    local info = handle:streamInfo():dynamicMetadata():get(NS)
    if not info then return end
    if handle:headers():get(":status") ~= "200" then return end -- the engine's error, as it sent it
    if info.stream then return stream_response(handle) end
    local resp = decode(whole_body(handle))
    if type(resp) ~= "table" then return end
    local answer = generated(resp)
    record_usage(handle, resp.usage, answer.finish_reason)
    set_body(handle, encode(answer))
  end
end
