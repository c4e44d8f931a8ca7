-- bench/primitives.lua: the earlier benchmark of rrengine's primitives, kept to run by hand
-- (`make bench` runs bench/run.lua, the whole job, instead). Runs inside spec/support/sandbox
-- (a private, real systemd user manager) with the engine as the interpreter:
--
--   spec/support/sandbox run -- ./rrengine bench/primitives.lua
--
-- Three figures, each against a baseline measured in the same run on the same units and
-- servers (bench/README.md explains what each number means and how it is taken):
--   1. restarting 50 fixture units: rr.systemd sequential and concurrent vs
--      `systemctl --user restart UNIT` run 50 times in a row;
--   2. 200 HTTP health probes (/health and /slow?ms=50): rr.http from 200 tasks vs
--      200 sequential `curl` processes;
--   3. detection latency: from the moment a warming-up fixture turns healthy to the moment
--      rr.health.check returns, vs a fixed 1 s polling loop on the same fixture.
--
-- It never asserts on timing. It stops and removes every unit it wrote, even after an error.
-- Knobs (environment): RR_BENCH_UNITS (50), RR_BENCH_ROUNDS (3), RR_BENCH_PROBES (200),
-- RR_BENCH_SERVERS (10), RR_BENCH_SLOW_MS (50), RR_BENCH_UNIT_TYPE (simple | notify).

-- The repository root (bench/..), for spec.support.units and bench.lib.
local function repo_root()
  local src = debug.getinfo(1, "S").source
  local path = src:sub(1, 1) == "@" and src:sub(2) or "bench/primitives.lua"
  if path:sub(1, 1) ~= "/" then path = (os.getenv("PWD") or ".") .. "/" .. path end
  local dir = path:match("^(.*)/bench/[^/]+$")
  return dir or "."
end
local ROOT = repo_root()
package.path = ROOT .. "/?.lua;" .. package.path

local rr = require("rr")
local systemd = require("rr.systemd")
local http = require("rr.http")
local proc = require("rr.proc")
local fs = require("rr.fs")
local health = require("rr.health")
local units = require("spec.support.units")
local lib = require("bench.lib")

local function env_int(name, default)
  local v = tonumber(os.getenv(name) or "")
  return v and math.tointeger(v) or default
end

local N_UNITS = env_int("RR_BENCH_UNITS", 50)
local ROUNDS = env_int("RR_BENCH_ROUNDS", 3)
local N_PROBES = env_int("RR_BENCH_PROBES", 200)
local N_SERVERS = math.min(env_int("RR_BENCH_SERVERS", 10), N_UNITS)
local SLOW_MS = env_int("RR_BENCH_SLOW_MS", 50)
local UNIT_TYPE = os.getenv("RR_BENCH_UNIT_TYPE") or "simple"
-- Warmups of the detection-latency trials, in seconds. Their fractional parts are spread
-- over [0, 1) so that the fixed 1 s poller meets every phase (its lag depends on where the
-- healthy moment falls between two of its probes); four fall inside rr.health's fast-probe
-- first second, four after it, where its probes have backed off.
local WARMUPS = { 0.15, 0.45, 0.75, 0.95, 1.35, 1.65, 2.25, 2.85 }
-- The health table of the latency trials: the services file's default health (interval 1 s).
local HC = { kind = "http", timeout = 15, retries = 3, interval = 1 }

-- curl must reach 127.0.0.1 directly, as rr.http does (it ignores proxy variables).
local NO_PROXY_ENV = { http_proxy = false, HTTP_PROXY = false, https_proxy = false,
  HTTPS_PROXY = false, all_proxy = false, ALL_PROXY = false }

local m -- the user manager (rr.systemd)
local created = {} -- unit names written into the sandbox, for the cleanup
local restart_units = {} -- { name, port, url }
local latency_units = {} -- { name, port, url, warmup }
local failed_sections = 0
local failed_operations = 0 -- restarts or probes that did not succeed (the figures are suspect)

-- Stop after ^C / SIGTERM: the section in flight raised "interrupted"; skip to the cleanup.
local function interrupted()
  return rr.interrupts() > 0
end

-- The first line of an error (a task's error may carry a traceback).
local function short(err)
  return (tostring(err):match("^[^\n]*"))
end

local W_LABEL, W_COL = 46, 13

local function first_line(s)
  return (s or ""):match("^[^\n]*") or ""
end

-- ---------------------------------------------------------------------------------------
-- Setup and cleanup

local function write_units()
  local pid = fs.getpid()
  for i = 1, N_UNITS do
    local name = ("rrbench%d-r%02d.service"):format(pid, i)
    local port = units.free_port()
    local _, url = units.fixture_unit(name, port, { type = UNIT_TYPE, notify = UNIT_TYPE == "notify" })
    created[#created + 1] = name
    restart_units[i] = { name = name, port = port, url = url }
  end
  for i, w in ipairs(WARMUPS) do
    local name = ("rrbench%d-w%02d.service"):format(pid, i)
    local port = units.free_port()
    local _, url = units.fixture_unit(name, port, { notify = true, warmup = w, reload = false })
    created[#created + 1] = name
    latency_units[i] = { name = name, port = port, url = url, warmup = w }
  end
end

-- Wait until url answers 200 (at most `limit` seconds); true | nil, last error.
local function wait_http_ok(url, limit)
  local deadline = rr.now() + limit
  local last
  while rr.now() < deadline do
    local res, err = http.get(url, { timeout = 1 })
    if res and res.status == 200 then return true end
    last = res and ("HTTP " .. res.status) or err
    rr.sleep(0.01)
  end
  return nil, last
end

-- Start the restart units (all at once) and wait until each one serves /health.
local function start_units()
  local tasks = {}
  for i, u in ipairs(restart_units) do
    tasks[i] = rr.spawn(function()
      local unit = assert(m:unit(u.name))
      assert(unit:start("replace"))
      local p = assert(unit:properties())
      if p.StartLimitIntervalUSec ~= 0 then
        error(("%s: StartLimitIntervalUSec=%s, expected 0"):format(u.name, tostring(p.StartLimitIntervalUSec)))
      end
      assert(wait_http_ok(u.url, 10))
      return true
    end)
  end
  for i, r in ipairs(rr.wait(tasks)) do
    if not r[1] then error(("cannot start %s: %s"):format(restart_units[i].name, tostring(r[2]))) end
  end
end

local function cleanup()
  if not m then return end
  local tasks = {}
  for _, name in ipairs(created) do
    tasks[#tasks + 1] = rr.spawn(function()
      local u = m:unit(name)
      if u then
        u:stop({ timeout = 10 })
        u:reset_failed()
      end
    end)
  end
  if #tasks > 0 then rr.wait(tasks) end
  for _, name in ipairs(created) do units.remove(name) end
  m:daemon_reload()
  created = {}
end

-- ---------------------------------------------------------------------------------------
-- 1. Unit restarts

-- CPU seconds (user + system) the sandbox's manager has used so far, from
-- /proc/$RR_SANDBOX_PID/stat (clock ticks: 10 ms resolution at 100 Hz); nil if unknown.
local CLK_TCK
local function manager_cpu()
  local pid = os.getenv("RR_SANDBOX_PID")
  if not pid or not pid:match("^%d+$") then return nil end
  local stat = fs.read("/proc/" .. pid .. "/stat")
  if not stat then return nil end
  -- fields after the ")" that closes the command name: state is field 3, utime 14, stime 15
  local rest = stat:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  local utime, stime = tonumber(f[12]), tonumber(f[13])
  if not utime or not stime then return nil end
  if not CLK_TCK then
    local res = proc.run({ "getconf", "CLK_TCK" }, { timeout = 10 })
    CLK_TCK = res and tonumber(first_line(res.stdout)) or 100
  end
  return (utime + stime) / CLK_TCK
end

-- Restarts every unit one after another with restart_one(unit) -> ok | nil, err; returns
-- seconds, failures, first error.
local function one_by_one(restart_one)
  local fails, first = 0, nil
  local t0 = rr.now()
  for _, u in ipairs(restart_units) do
    local ok, err = restart_one(u)
    if not ok then
      fails = fails + 1
      first = first or err
    end
  end
  return rr.now() - t0, fails, first
end

local function rr_restart(u)
  local unit, err = m:unit(u.name)
  if not unit then return nil, err end
  return unit:restart("replace")
end

-- Each method restarts every unit once and returns seconds, failures, first error.
local restart_methods = {
  systemctl = function()
    return one_by_one(function(u)
      return proc.run({ "systemctl", "--user", "restart", u.name }, { timeout = 60 })
    end)
  end,
  sequential = function()
    return one_by_one(rr_restart)
  end,
  concurrent = function()
    local fails, first = 0, nil
    local t0 = rr.now()
    local tasks = {}
    for i, u in ipairs(restart_units) do
      tasks[i] = rr.spawn(rr_restart, u)
    end
    local results = rr.wait(tasks)
    local dt = rr.now() - t0
    for _, r in ipairs(results) do
      if not (r[1] and r[2]) then
        fails = fails + 1
        first = first or tostring(r[3] or r[2])
      end
    end
    return dt, fails, first
  end,
}

local function bench_restarts()
  local order = { "systemctl", "sequential", "concurrent" }
  local times = { systemctl = {}, sequential = {}, concurrent = {} }
  local failures = { systemctl = 0, sequential = 0, concurrent = 0 }
  local cpu = { systemctl = {}, sequential = {}, concurrent = {} }
  local errors = {}
  for round = 1, ROUNDS do
    -- rotate the order each round: no method always runs first (or right after another)
    for k = 0, #order - 1 do
      local name = order[(k + round - 1) % #order + 1]
      lib.progress("restarts round %d: %s", round, name)
      local cpu0 = manager_cpu()
      local dt, fails, first = restart_methods[name]()
      local cpu1 = manager_cpu()
      if cpu0 and cpu1 then cpu[name][#cpu[name] + 1] = (cpu1 - cpu0) * 1000 / N_UNITS end
      times[name][#times[name] + 1] = dt * 1000 / N_UNITS
      failures[name] = failures[name] + fails
      if first and not errors[name] then errors[name] = first end
    end
  end
  print(("unit restarts (%d build/fixture units, Type=%s, StartLimitIntervalSec=0, %d rounds)")
    :format(N_UNITS, UNIT_TYPE, ROUNDS))
  lib.row("", W_LABEL, { "median", "min", "ratio(med)", "ratio(min)", "manager CPU" },
    { W_COL + 8, W_COL + 8, 11, 11, 19 })
  local base_med, base_min = lib.median(times.systemctl), lib.min(times.systemctl)
  local rows = {
    { "systemctl", "systemctl --user restart, sequential (baseline)" },
    { "sequential", "rr.systemd restart, sequential" },
    { "concurrent", ("rr.systemd restart, concurrent (%d tasks)"):format(N_UNITS) },
  }
  for _, r in ipairs(rows) do
    local med, min = lib.median(times[r[1]]), lib.min(times[r[1]])
    local cols = { lib.ms(med) .. " ms/unit", lib.ms(min) .. " ms/unit", "", "",
      #cpu[r[1]] > 0 and (lib.ms(lib.median(cpu[r[1]])) .. " ms/unit") or "-" }
    if r[1] ~= "systemctl" then
      cols[3] = lib.ratio(base_med, med)
      cols[4] = lib.ratio(base_min, min)
    end
    lib.row(r[2], W_LABEL, cols, { W_COL + 8, W_COL + 8, 11, 11, 19 })
  end
  print(("  (per round, all %d units: baseline %s ms, sequential %s ms, concurrent %s ms — medians)")
    :format(N_UNITS, lib.ms(lib.median(times.systemctl) * N_UNITS), lib.ms(lib.median(times.sequential) * N_UNITS),
      lib.ms(lib.median(times.concurrent) * N_UNITS)))
  for _, r in ipairs(rows) do
    if failures[r[1]] > 0 then
      failed_operations = failed_operations + failures[r[1]]
      print(("  !! %s: %d failed restarts (first: %s)"):format(r[2], failures[r[1]], short(errors[r[1]])))
    end
  end
  print()
  lib.flush()
end

-- ---------------------------------------------------------------------------------------
-- 2. Health probes

local function probe_urls(path)
  local list = {}
  for i = 1, N_PROBES do
    local u = restart_units[(i - 1) % N_SERVERS + 1]
    list[i] = ("http://127.0.0.1:%d%s"):format(u.port, path)
  end
  return list
end

-- Each method probes every URL once; returns seconds, failures (not 200), first error.
local probe_methods = {
  curl = function(urls)
    local fails, first = 0, nil
    local t0 = rr.now()
    for _, url in ipairs(urls) do
      local res, err = proc.run({ "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url },
        { timeout = 30, env = NO_PROXY_ENV })
      if not res or res.stdout ~= "200" then
        fails = fails + 1
        first = first or (res and ("HTTP " .. res.stdout) or err)
      end
    end
    return rr.now() - t0, fails, first
  end,
  concurrent = function(urls)
    local fails, first = 0, nil
    local t0 = rr.now()
    local tasks = {}
    for i, url in ipairs(urls) do
      tasks[i] = rr.spawn(function() return http.get(url, { timeout = 30 }) end)
    end
    local results = rr.wait(tasks)
    local dt = rr.now() - t0
    for _, r in ipairs(results) do
      local res = r[1] and r[2]
      if not res or res.status ~= 200 then
        fails = fails + 1
        first = first or (res and ("HTTP " .. res.status) or tostring(r[3] or r[2]))
      end
    end
    return dt, fails, first
  end,
  sequential = function(urls)
    local fails, first = 0, nil
    local t0 = rr.now()
    for _, url in ipairs(urls) do
      local res, err = http.get(url, { timeout = 30 })
      if not res or res.status ~= 200 then
        fails = fails + 1
        first = first or (res and ("HTTP " .. res.status) or err)
      end
    end
    return rr.now() - t0, fails, first
  end,
}

local function bench_probes(path, title, rows)
  local urls = probe_urls(path)
  local times, failures, errors = {}, {}, {}
  for _, r in ipairs(rows) do
    times[r[1]], failures[r[1]] = {}, 0
  end
  for round = 1, ROUNDS do
    for k = 0, #rows - 1 do
      local name = rows[(k + round - 1) % #rows + 1][1]
      lib.progress("%s round %d: %s", path, round, name)
      local dt, fails, first = probe_methods[name](urls)
      times[name][#times[name] + 1] = dt * 1000
      failures[name] = failures[name] + fails
      if first and not errors[name] then errors[name] = first end
    end
  end
  print(("%s (%d probes over %d fixture servers, %d rounds)"):format(title, N_PROBES, N_SERVERS, ROUNDS))
  lib.row("", W_LABEL, { "median", "min", "per probe", "ratio(med)", "ratio(min)" },
    { W_COL, W_COL, W_COL, 11, 11 })
  local base_med, base_min = lib.median(times.curl), lib.min(times.curl)
  for _, r in ipairs(rows) do
    local med, min = lib.median(times[r[1]]), lib.min(times[r[1]])
    local cols = { lib.ms(med) .. " ms", lib.ms(min) .. " ms", lib.ms(med / N_PROBES) .. " ms" }
    if r[1] ~= "curl" then
      cols[4] = lib.ratio(base_med, med)
      cols[5] = lib.ratio(base_min, min)
    end
    lib.row(r[2], W_LABEL, cols, { W_COL, W_COL, W_COL, 11, 11 })
  end
  for _, r in ipairs(rows) do
    if failures[r[1]] > 0 then
      failed_operations = failed_operations + failures[r[1]]
      print(("  !! %s: %d probes without a 200 (first: %s)"):format(r[2], failures[r[1]], short(errors[r[1]])))
    end
  end
  print()
  lib.flush()
end

-- ---------------------------------------------------------------------------------------
-- 3. Detection latency

-- The naive baseline: probe, and if not healthy sleep a fixed second, forever.
local function fixed_poller(hc)
  local deadline = rr.now() + hc.timeout
  local probes = 0
  while rr.now() < deadline do
    local kind = health.probe(hc, 1)
    probes = probes + 1
    if kind == "healthy" then return rr.now(), probes end
    rr.sleep(1)
  end
  return nil, probes
end

-- One trial: start the unit (Type=notify: the job ends at READY=1, which the fixture sends
-- right after it started listening and set its warmup deadline), run rr.health.check and
-- the fixed poller at once on it; returns a record with both lags in ms.
local function latency_trial(lu)
  local u = assert(m:unit(lu.name))
  local hc = { kind = HC.kind, url = lu.url, timeout = HC.timeout, retries = HC.retries, interval = HC.interval }
  local ok, err = u:start("replace")
  if not ok then return { warmup = lu.warmup, error = "start failed: " .. tostring(err) } end
  local t_job = rr.now()
  local rr_probes = 0
  local checker = rr.spawn(function()
    local hok, info = health.check(u, hc, { on_probe = function() rr_probes = rr_probes + 1 end })
    return rr.now(), hok, info
  end)
  local poller = rr.spawn(fixed_poller, hc)
  local props, perr = u:properties()
  local results = rr.wait({ checker, poller })
  u:stop({ timeout = 10 })
  local rec = { warmup = lu.warmup }
  if not props then
    rec.error = "cannot read properties: " .. tostring(perr)
    return rec
  end
  -- The healthy moment. The fixture, right after listen(), sets its deadline
  -- ready_at = now_ms() + (int64) (warmup * 1000) (CLOCK_MONOTONIC, truncated to whole ms),
  -- sends READY=1, and answers 200 from the instant now_ms() >= ready_at: the ms boundary
  -- ready_at itself. The manager records ActiveEnterTimestampMonotonic (µs, the same clock
  -- as rr.now()) when it processes that READY=1, microseconds after listen(). So
  -- healthy_at = floor_ms(ActiveEnter) + warmup_ms exactly, unless a ms boundary fell
  -- between listen() and the manager's timestamp: then it was 1 ms earlier.
  local active_us = props.ActiveEnterTimestampMonotonic or 0
  local active = active_us / 1e6
  if active_us <= 0 or active > t_job + 0.001 then
    rec.note = "ActiveEnterTimestamp unusable; used the start job's return"
    active_us = math.floor(t_job * 1e6)
    active = t_job
  end
  rec.exec_to_ready_ms = (active - (props.ExecMainStartTimestampMonotonic or 0) / 1e6) * 1000
  local healthy_at = (active_us // 1000 + math.floor(lu.warmup * 1000)) / 1000
  local c, p = results[1], results[2]
  if not c[1] then
    rec.error = "rr.health task failed: " .. tostring(c[2])
  elseif not c[3] then
    rec.error = "rr.health.check: " .. tostring(c[4])
  else
    rec.rr_ms = (c[2] - healthy_at) * 1000
    rec.rr_probes = rr_probes
  end
  if not p[1] then
    rec.error = (rec.error and rec.error .. "; " or "") .. "poller failed: " .. tostring(p[2])
  elseif not p[2] then
    rec.error = (rec.error and rec.error .. "; " or "") .. "fixed poller never saw it healthy"
  else
    rec.naive_ms = (p[2] - healthy_at) * 1000
    rec.naive_probes = p[3]
  end
  return rec
end

local function bench_latency()
  print(("detection latency (Type=notify fixture, --warmup W; %d trials)")
    :format(#WARMUPS))
  print(("  rr.health.check with interval=%gs, timeout=%gs vs a fixed %gs polling loop, both started"
    .. " on the same fixture as its start job returns"):format(HC.interval, HC.timeout, HC.interval))
  lib.row("W (s)", 8, { "rr.health lag", "probes", "1 s poll lag", "probes" }, { 16, 8, 16, 8 })
  lib.flush()
  local recs = {}
  for _, lu in ipairs(latency_units) do
    if interrupted() then break end
    local rec = latency_trial(lu)
    recs[#recs + 1] = rec
    lib.row(("%.2f"):format(rec.warmup), 8, {
      rec.rr_ms and (lib.ms(rec.rr_ms) .. " ms") or "-", rec.rr_probes or "-",
      rec.naive_ms and (lib.ms(rec.naive_ms) .. " ms") or "-", rec.naive_probes or "-",
    }, { 16, 8, 16, 8 })
    if rec.error then
      failed_operations = failed_operations + 1
      print("    !! " .. short(rec.error))
    end
    if rec.note then print("    (" .. rec.note .. ")") end
    lib.flush()
  end
  local function collect(pred)
    local a, b = {}, {}
    for _, r in ipairs(recs) do
      if pred(r) then
        if r.rr_ms then a[#a + 1] = r.rr_ms end
        if r.naive_ms then b[#b + 1] = r.naive_ms end
      end
    end
    return a, b
  end
  print()
  lib.row("lag from healthy to seen", W_LABEL, { "median", "mean", "max", "ratio(med)" }, { W_COL, W_COL, W_COL, 11 })
  local groups = {
    { "all trials", function() return true end },
    { "W < 1 s (rr.health's fast-probe second)", function(r) return r.warmup < 1 end },
    { "W >= 1 s (probes backed off)", function(r) return r.warmup >= 1 end },
  }
  for _, g in ipairs(groups) do
    local a, b = collect(g[2])
    print("  " .. g[1])
    lib.row("  fixed 1 s polling (baseline)", W_LABEL - 0,
      { lib.ms(lib.median(b)) .. " ms", lib.ms(lib.mean(b)) .. " ms", lib.ms(lib.max(b)) .. " ms" },
      { W_COL, W_COL, W_COL })
    lib.row("  rr.health.check", W_LABEL,
      { lib.ms(lib.median(a)) .. " ms", lib.ms(lib.mean(a)) .. " ms", lib.ms(lib.max(a)) .. " ms",
        lib.ratio(lib.median(b), lib.median(a)) },
      { W_COL, W_COL, W_COL, 11 })
  end
  local exec_ready = {}
  for _, r in ipairs(recs) do
    if r.exec_to_ready_ms then exec_ready[#exec_ready + 1] = r.exec_to_ready_ms end
  end
  print(("  (healthy moment = the fixture's own deadline, floor_ms(ActiveEnterTimestamp) + W, exact to"
    .. " the ms boundary it flips on, or 1 ms earlier; exec to READY=1 took %s ms median)")
    :format(lib.ms(lib.median(exec_ready))))
  print()
  lib.flush()
end

-- ---------------------------------------------------------------------------------------
-- Main

local function header()
  local kernel = first_line(fs.read("/proc/sys/kernel/osrelease"))
  local sd = proc.run({ "systemctl", "--version" }, { timeout = 10 })
  local curl = proc.run({ "curl", "--version" }, { timeout = 10 })
  local cpus = 0
  local info = fs.read("/proc/cpuinfo") or ""
  for _ in info:gmatch("\nprocessor%s*:") do cpus = cpus + 1 end
  if info:match("^processor%s*:") then cpus = cpus + 1 end
  print("rrengine bench — sandboxed systemd user manager, 127.0.0.1 only")
  print(("  kernel %s, %d CPUs, %s, %s"):format(kernel, cpus, first_line(sd and sd.stdout),
    (first_line(curl and curl.stdout):match("^(curl %S+)") or "curl ?")))
  print()
  lib.flush()
end

local function run_section(name, fn)
  if interrupted() then return end
  if not lib.section(name, fn) then failed_sections = failed_sections + 1 end
end

local function main()
  local t_start = rr.now()
  header()
  m = assert(systemd.user())
  lib.progress("writing %d restart units and %d latency units", N_UNITS, #WARMUPS)
  write_units()
  assert(m:daemon_reload())
  start_units()

  run_section("unit restarts", bench_restarts)
  run_section("health probes", function()
    -- the probe servers are the first N_SERVERS restart units: make sure they are up again
    for i = 1, N_SERVERS do assert(wait_http_ok(restart_units[i].url, 10)) end
    bench_probes("/health", "health probes, GET /health", {
      { "curl", "curl, sequential processes (baseline)" },
      { "concurrent", ("rr.http, concurrent (%d tasks)"):format(N_PROBES) },
      { "sequential", "rr.http, sequential (one task)" },
    })
    if interrupted() then return end
    bench_probes(("/slow?ms=%d"):format(SLOW_MS), ("slow probes, GET /slow?ms=%d"):format(SLOW_MS), {
      { "curl", "curl, sequential processes (baseline)" },
      { "concurrent", ("rr.http, concurrent (%d tasks)"):format(N_PROBES) },
    })
  end)
  run_section("detection latency", bench_latency)
  if interrupted() then
    print("interrupted: remaining figures skipped")
    failed_sections = failed_sections + 1
  end
  print(("total bench time %.1f s"):format(rr.now() - t_start))
end

local ok, err = xpcall(main, debug.traceback)
if not ok then
  print("bench failed: " .. tostring(err))
  failed_sections = failed_sections + 1
end
lib.progress("cleanup: stopping and removing %d units", #created)
local cok, cerr = xpcall(cleanup, debug.traceback)
if not cok then
  print("cleanup failed: " .. tostring(cerr))
  failed_sections = failed_sections + 1
end
if failed_sections > 0 or failed_operations > 0 then
  print(("bench finished with errors: %d section(s) failed, %d operation(s) failed — figures above are"
    .. " not reliable"):format(failed_sections, failed_operations))
end
io.stdout:flush()
os.exit((failed_sections == 0 and failed_operations == 0) and 0 or 1)
