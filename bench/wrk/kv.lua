-- wrk script for bench/run.py: one key-value workload against one server flavour.
--
--   wrk -t T -c C -d D -s bench/wrk/kv.lua URL -- FLAVOR WORKLOAD KEYS PUT_PERCENT SEED
--
-- FLAVOR   kvd (also the bare Tornado servers) | flask | webdis | etcd
-- WORKLOAD put | get | mixed | list
-- KEYS     keys k0 .. k(KEYS-1); get/mixed/list expect them preloaded
-- PUT_PERCENT share of writes in `mixed` (default 10)
-- SEED     mixed into every thread's random seed (a run's repeat number)
--
-- Each thread gets its own id in setup() and seeds its generator with it in
-- init(), so threads walk different random key sequences. Every request a
-- thread can send is formatted once in init(); request() only picks one, so
-- wrk spends its time on the socket, not in Lua.
-- done() prints one line, BENCH_RESULT {json}, that bench/run.py parses.

local threads_started = 0

function setup(thread)
   threads_started = threads_started + 1
   thread:set("id", threads_started)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(data)
   local out = {}
   for i = 1, #data, 3 do
      local a, b, c = data:byte(i, i + 2)
      local n = a * 65536 + (b or 0) * 256 + (c or 0)
      local c1 = math.floor(n / 262144) % 64
      local c2 = math.floor(n / 4096) % 64
      local c3 = math.floor(n / 64) % 64
      local c4 = n % 64
      out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
         .. (b and B64:sub(c3 + 1, c3 + 1) or "=")
         .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
   end
   return table.concat(out)
end

-- A 100-byte JSON string value, the same for every server.
local VALUE = '"' .. string.rep("x", 98) .. '"'

local function headers(content_type)
   local h = { Host = wrk.headers["Host"] }
   if content_type then
      h["Content-Type"] = content_type
   end
   return h
end

local function put_request(key)
   if flavor == "kvd" then
      return wrk.format("PUT", "/keys/" .. key, headers("application/json"), VALUE)
   elseif flavor == "flask" then
      -- The original design has no single-key PUT: one pair in PUT /keys.
      return wrk.format("PUT", "/keys", headers("application/json"),
         '{"' .. key .. '":' .. VALUE .. "}")
   elseif flavor == "webdis" then
      return wrk.format("PUT", "/SET/" .. key, headers(nil), VALUE)
   elseif flavor == "etcd" then
      return wrk.format("POST", "/v3/kv/put", headers("application/json"),
         '{"key":"' .. b64(key) .. '","value":"' .. b64(VALUE) .. '"}')
   end
   error("unknown flavour " .. tostring(flavor))
end

local function get_request(key)
   if flavor == "kvd" or flavor == "flask" then
      return wrk.format("GET", "/keys/" .. key, headers(nil))
   elseif flavor == "webdis" then
      return wrk.format("GET", "/GET/" .. key, headers(nil))
   elseif flavor == "etcd" then
      return wrk.format("POST", "/v3/kv/range", headers("application/json"),
         '{"key":"' .. b64(key) .. '"}')
   end
   error("unknown flavour " .. tostring(flavor))
end

local function list_request()
   -- Keys whose name starts with k1: k1, k10..k19, k100..k199, ...
   if flavor == "kvd" or flavor == "flask" then
      return wrk.format("GET", "/keys?filter=k1$", headers(nil))
   elseif flavor == "webdis" then
      return wrk.format("GET", "/KEYS/k1*", headers(nil))
   elseif flavor == "etcd" then
      return wrk.format("POST", "/v3/kv/range", headers("application/json"),
         '{"key":"' .. b64("k1") .. '","range_end":"' .. b64("k2") .. '"}')
   end
   error("unknown flavour " .. tostring(flavor))
end

function init(args)
   flavor = args[1] or "kvd"
   workload = args[2] or "get"
   nkeys = tonumber(args[3] or "10000")
   put_percent = tonumber(args[4] or "10")
   local seed = tonumber(args[5] or "0")
   math.randomseed(id * 1000003 + seed * 7919)
   for _ = 1, 10 do math.random() end  -- the first draws after seeding are poorly mixed
   puts, gets = {}, {}
   if workload == "put" or workload == "mixed" then
      for i = 1, nkeys do puts[i] = put_request("k" .. (i - 1)) end
   end
   if workload == "get" or workload == "mixed" then
      for i = 1, nkeys do gets[i] = get_request("k" .. (i - 1)) end
   end
   if workload == "list" then
      listing = list_request()
   elseif workload ~= "put" and workload ~= "get" and workload ~= "mixed" then
      error("unknown workload " .. tostring(workload))
   end
end

function request()
   if workload == "get" then
      return gets[math.random(nkeys)]
   elseif workload == "put" then
      return puts[math.random(nkeys)]
   elseif workload == "mixed" then
      if math.random(100) <= put_percent then
         return puts[math.random(nkeys)]
      end
      return gets[math.random(nkeys)]
   end
   return listing
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
      .. '"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
