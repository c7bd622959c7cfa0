-- wrk script for `whittle serve` on an encoder: POST /v1/embeddings, one STS-B sentence per request,
-- cycling through the file given as the first script argument (one sentence per line).
-- wrk -t2 -c16 -d60s -s scripts/wrk_embeddings.lua http://127.0.0.1:8080 -- sentences.txt
local bodies = {}
local i = 0

local function escape(s)
  return (s:gsub('\\', '\\\\'):gsub('"', '\\"'):gsub('\t', ' '))
end

function init(args)
  local f = assert(io.open(args[1] or "sentences.txt", "r"))
  for line in f:lines() do
    if #line > 0 then
      bodies[#bodies + 1] = '{"input": "' .. escape(line) .. '"}'
    end
  end
  f:close()
  i = math.random(#bodies)
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/embeddings", { ["Content-Type"] = "application/json" }, bodies[i])
end
