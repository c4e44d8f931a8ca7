-- spec/support/haproxy.lua: a real HAProxy (Debian's haproxy) in front of real fixture servers,
-- for the specs of rr.socket, rr.haproxy and rr.balancer.
--
--   local hx = require("spec.support.haproxy")
--   local a = hx.fixture({ "--delay-ms", "50" })        -- build/fixture on a free port
--   local h = hx.start({ servers = { { name = "s1", port = a.port } } })
--   -- h.socket (admin socket, level admin), h.port (frontend on 127.0.0.1), h.backend ("app")
--   h:stop(); a:stop()
--
-- HAProxy runs in the foreground in master-worker mode (`haproxy -W -db -f CONFIG`) under
-- rr.proc, in a process group of its own: h:stop() (or the handle's collection) kills it by
-- its PID. Its master prints "Loading success." once the worker runs with every listener and
-- the admin socket bound: start() waits for that line, not for a time. A fixture prints
-- "listening on 127.0.0.1:PORT" once it listens (started with --port 0: the kernel picks the
-- port, nothing to reserve).
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local units = require("spec.support.units")

local hx = {}

hx.fixture_bin = units.fixture_bin
hx.root = units.root

-- Spawns argv and waits until one of its output lines matches pattern (within timeout seconds).
-- Returns the process handle, the pattern's captures and the lines seen so far; raises with
-- what the process printed when it exits first or never prints the line.
local function spawn_until(argv, pattern, timeout)
  local lines, found = {}, nil
  local gate = rr.spawn(function() rr.sleep(timeout) end)
  local p, err = proc.spawn(argv, {
    capture = false,
    on_line = function(_, line)
      if #lines < 200 then lines[#lines + 1] = line end
      if not found then
        local caps = table.pack(line:match(pattern))
        if caps[1] ~= nil then
          found = caps
          gate:cancel() -- the line is the signal
        end
      end
    end,
  })
  if not p then
    gate:cancel()
    error(("cannot start %s: %s"):format(argv[1], err), 2)
  end
  local exited = rr.spawn(function() return p:wait() end)
  rr.wait_any(gate, exited)
  gate:cancel()
  if not found then
    exited:cancel()
    p:close()
    error(("%s did not print %q within %g s:\n%s"):format(table.concat(argv, " "), pattern, timeout,
      table.concat(lines, "\n")), 2)
  end
  exited:cancel()
  return p, found, lines
end
hx.spawn_until = spawn_until

-- A fixture server (build/fixture --host 127.0.0.1 --port 0 ARGS...). Returns
-- { port =, proc =, pid =, stop = fn, kill = fn(sig) }.
function hx.fixture(args)
  local argv = { hx.fixture_bin, "--host", "127.0.0.1", "--port", "0" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p, caps = spawn_until(argv, "listening on 127%.0%.0%.1:(%d+)", 10)
  local f = { proc = p, pid = p:pid(), port = tonumber(caps[1]) }
  -- Kill it (SIGTERM unless sig) and reap it; idempotent.
  function f:kill(sig)
    if self.proc then
      if self.proc:running() then self.proc:kill(sig or "TERM") end
      self.proc:wait()
      self.proc:close()
      self.proc = nil
    end
  end
  f.stop = f.kill
  return f
end

-- The configuration text for hx.start's options (see there).
function hx.config(o)
  local lines = {
    "global",
    "  stats socket " .. o.socket .. " mode 600 level admin",
    "  stats timeout 10s",
  }
  for _, l in ipairs(o.global or {}) do lines[#lines + 1] = "  " .. l end
  for _, l in ipairs({
    "defaults",
    "  mode http",
    "  timeout connect 1s",
    "  timeout client 10s",
    "  timeout server 10s",
    "frontend fe",
    "  bind 127.0.0.1:" .. o.port,
    "  default_backend " .. o.backend,
    "backend " .. o.backend,
    "  balance roundrobin",
  }) do lines[#lines + 1] = l end
  if o.check then lines[#lines + 1] = "  option httpchk GET /health" end
  for _, l in ipairs(o.backend_options or {}) do lines[#lines + 1] = "  " .. l end
  for _, s in ipairs(o.servers or {}) do
    local line = ("  server %s 127.0.0.1:%d"):format(s.name, s.port)
    if o.check then line = line .. " check inter " .. (o.check_interval or "500ms") end
    if s.weight then line = line .. " weight " .. s.weight end
    lines[#lines + 1] = line
  end
  if o.extra then lines[#lines + 1] = o.extra end
  return table.concat(lines, "\n") .. "\n"
end

-- Starts HAProxy. Options:
--   servers = { { name =, port = [, weight =] } ... }   the backend's servers (127.0.0.1)
--   backend = "app"                                      the backend's name
--   check = false                                        HTTP health checks (GET /health)
--   global = { "maxconn 100", ... }                      more lines in the global section
--   user_socket = false                                  a second admin socket at level user
--                                                        (h.user_socket: may read, not change)
--   backend_options = { "retries 3", ... }               more lines in the backend section
--   extra = "frontend x\n  ..."                          more configuration text at the end
--   ports = n                                            free ports to reserve for `extra`
--                                                        (h.ports[i]; extra may be a function
--                                                        of that list)
-- Returns h = { socket =, port =, backend =, dir =, config =, pid =, ports =, stop = fn }.
function hx.start(o)
  o = o or {}
  local dir = assert(fs.mkdtemp("/tmp/rr-haproxy-"))
  local ports = {}
  for i = 1, o.ports or 0 do ports[i] = units.free_port() end
  local c = {
    socket = dir .. "/admin.sock",
    port = units.free_port(),
    backend = o.backend or "app",
    servers = o.servers,
    check = o.check,
    check_interval = o.check_interval,
    backend_options = o.backend_options,
    global = { table.unpack(o.global or {}) },
    extra = type(o.extra) == "function" and o.extra(ports) or o.extra,
  }
  if o.user_socket then
    table.insert(c.global, "stats socket " .. dir .. "/user.sock mode 600 level user")
  end
  local config = dir .. "/haproxy.cfg"
  assert(fs.write_atomic(config, hx.config(c)))
  local ok, p = pcall(spawn_until, { "haproxy", "-W", "-db", "-f", config }, "Loading success", 10)
  if not ok then
    fs.remove_tree(dir)
    error(p, 2)
  end
  local h = { socket = c.socket, port = c.port, backend = c.backend, dir = dir, config = config,
              proc = p, pid = p:pid(), ports = ports, user_socket = o.user_socket and dir .. "/user.sock" or nil }
  -- Stops HAProxy (SIGTERM to its group: the master stops its worker) and removes its directory.
  function h:stop()
    if self.proc then
      if self.proc:running() then self.proc:kill("TERM") end
      self.proc:wait()
      self.proc:close()
      self.proc = nil
      fs.remove_tree(self.dir)
    end
  end
  return h
end

-- wrk against url for `duration` seconds with `connections` connections (one thread). Returns
-- a running load: load:wait() -> { requests =, non2xx =, socket_errors =, output = }.
function hx.wrk(url, duration, connections)
  local argv = { "wrk", "-t1", "-c" .. tostring(connections or 4), "-d" .. tostring(duration or 2) .. "s",
                 "--timeout", "5s", url }
  local p = assert(proc.spawn(argv, { timeout = (duration or 2) + 30 }))
  local load = { proc = p }
  function load:wait()
    local res, err, _, r = self.proc:wait()
    res = res or r
    assert(res and res.exit_code == 0, ("wrk failed: %s %s %s"):format(tostring(err), res and res.stdout or "",
      res and res.stderr or ""))
    return hx.parse_wrk(res.stdout)
  end
  return load
end

-- wrk through HAProxy (url) for as long as the test takes: started only once its requests reach
-- a server (HAProxy's own counters say so); load.stop() -> wrk's counts (as hx.parse_wrk).
function hx.load(hp, url)
  local function served()
    local total = 0
    for _, s in pairs(hx.server_counts(hp)) do total = total + s.total end
    return total
  end
  local before = served()
  local p = assert(proc.spawn({ "wrk", "-t1", "-c8", "-d120s", "--timeout", "5s", url }, { timeout = 150 }))
  assert(require("spec.support.helpers").eventually(function() return served() > before + 10 end),
    "wrk's requests never reached the servers")
  local load = {}
  function load.stop()
    assert(p:kill("INT"))
    local res, err, _, r = p:wait()
    res = res or r
    assert(res and res.exit_code == 0, ("wrk failed: %s %s %s"):format(tostring(err), res and res.stdout or "",
      res and res.stderr or ""))
    return hx.parse_wrk(res.stdout)
  end
  return load
end

-- Calls sample() about every 20 ms in a task until w.stop() (which waits for that task and
-- returns w): the samplers of the group, canary and blue-green specs. w.samples counts them.
function hx.sample(w, sample)
  w.samples = w.samples or 0
  local stopping = false
  local task = rr.spawn(function()
    while not stopping do
      local t0 = rr.now()
      sample()
      w.samples = w.samples + 1
      rr.sleep(math.max(0, 0.02 - (rr.now() - t0)))
    end
  end)
  function w.stop()
    stopping = true
    local ok, err = rr.wait(task)
    assert(ok, err)
    return w
  end
  return w
end

-- The answers each server of hp's backend gave so far, from one `show stat` (HAProxy's own
-- counters: what the clients got from that server): name -> { total =, ["2xx"] =, ["5xx"] = }.
function hx.server_counts(hp)
  local haproxy = require("rr.haproxy")
  local answer = assert(hp:command(("show stat %s 4 -1"):format(hp.backend)))
  local rows = assert(haproxy.parse_stat(answer), answer)
  local out = {}
  for _, r in ipairs(rows) do
    if r.svname ~= "BACKEND" and r.svname ~= "FRONTEND" then
      out[r.svname] = { total = tonumber(r.stot) or 0, ["2xx"] = tonumber(r.hrsp_2xx) or 0,
        ["5xx"] = tonumber(r.hrsp_5xx) or 0 }
    end
  end
  return out
end

-- The counts in wrk's report: requests, non-2xx/3xx answers, socket errors (all kinds).
function hx.parse_wrk(out)
  local r = { output = out, non2xx = 0, socket_errors = 0 }
  r.requests = tonumber(out:match("(%d+) requests in"))
  r.non2xx = tonumber(out:match("Non%-2xx or 3xx responses: (%d+)")) or 0
  local c, rd, w, t = out:match("Socket errors: connect (%d+), read (%d+), write (%d+), timeout (%d+)")
  if c then r.socket_errors = tonumber(c) + tonumber(rd) + tonumber(w) + tonumber(t) end
  assert(r.requests, "no request count in wrk's output:\n" .. out)
  return r
end

return hx
