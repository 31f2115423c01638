-- wrk script: single-key requests for keys k0 .. k9999 against kvd, for A/B runs of
-- one request path against another commit (not part of bench/run.py's table).
--
--   wrk -t 2 -c 64 -d 5 -s bench/wrk/ab.lua URL -- MODE
--
-- MODE put: only PUTs of a 100-byte JSON string; churn: each request a PUT or a DELETE
-- of a random key, half and half (a DELETE of a key already gone is a 404). No HEAD mode:
-- wrk waits for the body a HEAD answer's Content-Length announces, which never comes.
-- Each thread seeds its generator with its own number, so threads walk different keys.

local threads_started = 0

function setup(thread)
   threads_started = threads_started + 1
   thread:set("id", threads_started)
end

function init(args)
   math.randomseed(id * 7919)
   mode = args[1] or "churn"
end

local VALUE = '"' .. string.rep("x", 98) .. '"'

function request()
   local key = "k" .. math.random(0, 9999)
   if mode == "churn" and math.random() < 0.5 then
      return wrk.format("DELETE", "/keys/" .. key, { Host = "kvd" })
   end
   return wrk.format("PUT", "/keys/" .. key, { Host = "kvd", ["Content-Type"] = "application/json" }, VALUE)
end
