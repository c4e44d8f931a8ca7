-- bench/run.lua: `make bench` — the whole job, timed, against a shell loop in the same run.
-- Runs inside spec/support/sandbox (a private, real systemd user manager) with the engine as
-- the interpreter:
--
--   spec/support/sandbox run -- ./rrengine bench/run.lua
--
-- For each size (20 services, delay 0.2 s; 60, 0.2 s; 300, 0.05 s) it generates a platform of
-- fixture units in a 4-layer dependency graph (bench/platform.lua) and runs, one after the
-- other: a shell loop (systemctl restart + curl every 50 ms, in topological order),
-- `rrengine plans/rolling.lua` sequential, and the same with --parallel. Each run is checked
-- against systemd's timestamps and the fixtures' own ready times (bench/job.lua). Then a
-- 1000-endpoint health fan-out, the whole job at N=1000 (peak RSS), and loading a 1000-service
-- file. bench/README.md says what every figure means. It never asserts on timing.
--
-- Knobs (environment): RR_BENCH_SIZES ("20:0.2,60:0.2,300:0.05"), RR_BENCH_FANOUT (1000),
-- RR_BENCH_PARALLEL (1000: the --parallel value that stands for "no limit"),
-- RR_BENCH_ROUNDS (3: fan-out rounds), RR_BENCH_BIG (1: also the whole job at N=RR_BENCH_FANOUT).

local function repo_root()
  local src = debug.getinfo(1, "S").source
  local path = src:sub(1, 1) == "@" and src:sub(2) or "bench/run.lua"
  if path:sub(1, 1) ~= "/" then path = (os.getenv("PWD") or ".") .. "/" .. path end
  return path:match("^(.*)/bench/[^/]+$") or "."
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
local platform = require("bench.platform")
local job = require("bench.job")

local function env_int(name, default)
  local v = tonumber(os.getenv(name) or "")
  return v and math.tointeger(v) or default
end

local SIZES = {}
for n, d in (os.getenv("RR_BENCH_SIZES") or "20:0.2,60:0.2,300:0.05"):gmatch("(%d+):([%d.]+)") do
  SIZES[#SIZES + 1] = { n = tonumber(n), delay = tonumber(d) }
end
local FANOUT = env_int("RR_BENCH_FANOUT", 1000)
local PARALLEL = env_int("RR_BENCH_PARALLEL", 1000)
local ROUNDS = env_int("RR_BENCH_ROUNDS", 3)
-- The whole job at N=RR_BENCH_FANOUT too (1000 units: about 2 minutes more here), for its peak RSS.
local BIG = os.getenv("RR_BENCH_BIG") == "1"
-- A profiler around the engine of the measured sequential runs, e.g.
-- RR_BENCH_WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" (figures then mean
-- nothing; the verification still holds).
local WRAP = {}
for w in (os.getenv("RR_BENCH_WRAP") or ""):gmatch("%S+") do WRAP[#WRAP + 1] = w end

local m
local prefix = ("rrb%d"):format(fs.getpid())
local dir -- scratch directory: services files, scripts, ready files, event logs
local platforms = {} -- every generated platform, for the cleanup
local failures = 0
local results = {} -- label -> method -> result

local function interrupted() return rr.interrupts() > 0 end
local function first_line(s) return (s or ""):match("^[^\n]*") or "" end

-- ---------------------------------------------------------------------------------------
-- Setup and cleanup

local function wait_http_ok(url, limit)
  local deadline = rr.now() + limit
  local last
  while rr.now() < deadline do
    local res, err = http.get(url, { timeout = 1 })
    if res and res.status == 200 then return true end
    last = res and ("HTTP " .. res.status) or err
    rr.sleep(0.02)
  end
  return nil, last
end

-- Start every unit of p at once, and wait until each answers 200.
local function start_all(p)
  local tasks = {}
  for i, u in ipairs(p.units) do
    tasks[i] = rr.spawn(function()
      local unit = assert(m:unit(u.unit))
      assert(unit:start("replace"))
      assert(wait_http_ok(u.url, 30))
    end)
  end
  for i, r in ipairs(rr.wait(tasks)) do
    if not r[1] then error(("cannot start %s: %s"):format(p.units[i].unit, tostring(r[2]))) end
  end
end

-- Stop p's units, remove their files, daemon-reload: the next section's manager has only its
-- own units (systemd's job times grow with the number of units loaded).
local function teardown(p)
  local tasks = {}
  for _, u in ipairs(p.units) do
    tasks[#tasks + 1] = rr.spawn(function()
      local unit = m:unit(u.unit)
      if unit then
        unit:stop({ timeout = 20 })
        unit:reset_failed()
      end
    end)
  end
  if #tasks > 0 then rr.wait(tasks) end
  for _, u in ipairs(p.units) do units.remove(u.unit) end
  m:daemon_reload()
  for k, q in ipairs(platforms) do
    if q == p then table.remove(platforms, k) break end
  end
end

-- Generate a platform, load it and start every unit.
local function setup(o)
  local t0 = rr.now()
  local p = platform.generate({ label = o.label, n = o.n, delay = o.delay, dir = dir, prefix = prefix })
  platforms[#platforms + 1] = p
  assert(m:daemon_reload())
  lib.progress("%s: starting %d units", p.label, p.n)
  start_all(p)
  lib.progress("%s: setup took %.1f s", p.label, rr.now() - t0)
  return p
end

-- The fan-out's servers: plain child processes (no units: starting 1000 units costs the manager
-- most of a minute here, and a probe does not care who started its server).
local servers = {}

local function spawn_servers(n)
  local list = {}
  for i = 1, n do
    local pf = ("%s/fan-%04d.port"):format(dir, i)
    servers[i] = assert(proc.spawn({ units.fixture_bin, "--port", "0", "--port-file", pf }, { capture = false }))
    list[i] = { port_file = pf }
  end
  local deadline = rr.now() + 60
  for _, s in ipairs(list) do
    local text = fs.read(s.port_file)
    while not text do
      if rr.now() > deadline then error("fan-out servers did not start within 60 s") end
      rr.sleep(0.01)
      text = fs.read(s.port_file)
    end
    s.url = ("http://127.0.0.1:%d/health"):format(tonumber(text))
  end
  return list
end

local function stop_servers()
  for _, s in ipairs(servers) do s:close() end
  servers = {}
end

local function cleanup()
  stop_servers()
  if not m then return end
  while #platforms > 0 do teardown(platforms[#platforms]) end
  if dir then fs.remove_tree(dir) end
end

-- ---------------------------------------------------------------------------------------
-- Printing

local function ms(s) return s and lib.ms(s * 1000) or "-" end
local function secs(s) return s and ("%.2f s"):format(s) or "-" end
local function mb(kb) return kb and ("%.1f MB"):format(kb / 1024) or "-" end

local function describe_problems(r)
  if r.error then
    failures = failures + 1
    print("    !! run failed: " .. first_line(r.error))
    io.stderr:write(r.error, "\n")
  end
  if r.problems and r.problems.count > 0 then
    failures = failures + 1
    print(("    !! NOT VERIFIED: %d problem(s) in systemd's timestamps:"):format(r.problems.count))
    for _, line in ipairs(r.problems) do print("       " .. line) end
  end
end

local METHODS = {
  { "shell", "shell loop: systemctl restart + curl/50ms" },
  { "sequential", "rrengine plans/rolling.lua (sequential)" },
  { "parallel", nil }, -- label set at run time (--parallel N)
}

local COLS = { 10, 10, 11, 11, 10, 10, 11, 9 }
local function job_header()
  lib.row("", 42, { "wall", "per svc", "overhead", "CPU", "CPU/svc", "peak RSS", "manager", "verified" }, COLS)
  lib.row("", 42, { "", "", "per svc", "(child)", "", "", "CPU", "" }, COLS)
end

-- One row; overhead per service = (wall - the sum of every unit's stop-to-healthy time) / N,
-- meaningful for one-at-a-time runs only.
local function job_row(label, r)
  local per = r.wall / r.n
  local overhead = r.method ~= "parallel" and (r.wall - r.irreducible) / r.n or nil
  lib.row(label, 42, {
    secs(r.wall), ms(per) .. " ms", overhead and (ms(overhead) .. " ms") or "-",
    r.cpu and ms(r.cpu) .. " ms" or "-", r.cpu and (ms(r.cpu / r.n) .. " ms") or "-",
    mb(r.maxrss_kb), r.manager_cpu and ms(r.manager_cpu) .. " ms" or "-",
    (r.error or r.problems.count > 0) and "NO" or "yes",
  }, COLS)
  r.overhead = overhead
  describe_problems(r)
  lib.flush()
end

local function phase_table(seq, par)
  print("  where the time goes, from the event log (mean ms per service; ts has 1 ms steps):")
  local rows = {
    { "startup: spawn -> PLAN_START (total)", "startup" },
    { "PLAN_START -> first service starts (total)", "first" },
    { "pre-check (SERVICE_RESTART_START -> passed)", "pre" },
    { "pre-check passed -> UNIT_RESTART (snapshot)", "def" },
    { "restart job, as the engine waits for it", "job" },
    { "restart job, systemd's stop -> active", "job_systemd" },
    { "job done -> fixture healthy (exec + delay)", "to_ready" },
    { "fixture healthy -> post-check passed (lag)", "lag" },
    { "post-check -> SERVICE_RESTART_SUCCESS", "after_post" },
    { "SUCCESS -> next service's START", "between" },
    { "(sum of the rows above, incl. totals / N)", "sum" },
    { "PLAN_END -> exit (total)", "shutdown" },
  }
  lib.row("", 46, { "sequential", "parallel" }, { 12, 12 })
  for _, row in ipairs(rows) do
    local a = seq and seq.phases and seq.phases[row[2]]
    local b = par and par.phases and par.phases[row[2]]
    lib.row(row[1], 46, { a and lib.ms(a) or "-", b and lib.ms(b) or "-" }, { 12, 12 })
  end
end

-- ---------------------------------------------------------------------------------------
-- The whole job

local function run_one(p, method, measured)
  lib.progress("%s: %s", p.label, method)
  return job.run({ p = p, method = method, parallel = PARALLEL, m = m, root = ROOT, dir = dir,
    manager_pid = tonumber(os.getenv("RR_SANDBOX_PID") or ""),
    wrap = measured and method == "sequential" and WRAP or nil })
end

local function bench_size(p)
  print(("whole job: %d services in 4 layers, each healthy %.2f s after it starts (HTTP 503 before),"
    .. " stabilize = 0"):format(p.n, p.delay))
  -- A first, unmeasured run: a service's first run snapshots its definition as the known good
  -- one; every later run (the normal case) does not. It also proves the platform works.
  lib.progress("%s: warm-up run (parallel)", p.label)
  local warm = run_one(p, "parallel")
  if warm.error or warm.problems.count > 0 then
    describe_problems(warm)
    error("warm-up run failed")
  end
  job_header()
  local res = {}
  results[p.label] = res
  for _, mth in ipairs(METHODS) do
    if interrupted() then return end
    local r = run_one(p, mth[1], true)
    res[mth[1]] = r
    job_row(mth[2] or ("rrengine --parallel %d (no limit)"):format(PARALLEL), r)
  end
  local shell, seq, par = res.shell, res.sequential, res.parallel
  if shell and seq and shell.overhead and seq.overhead then
    print(("  sequential: engine overhead %s ms/service vs the shell loop's %s ms (%s of it); wall %s"
      .. " of the shell loop's"):format(lib.ms(seq.overhead * 1000), lib.ms(shell.overhead * 1000),
      lib.ratio(1, shell.overhead / seq.overhead), lib.ratio(seq.wall, shell.wall)))
  end
  if par and par.critical_path then
    local bound = math.max(par.critical_path, par.manager_cpu or 0)
    par.bound = bound
    print(("  parallel: wall %s vs the DAG bound %s (critical path incl. job times %s, manager CPU %s):"
      .. " %.2fx the bound"):format(secs(par.wall), secs(bound), secs(par.critical_path),
      secs(par.manager_cpu), par.wall / bound))
    if par.machine_busy then
      print(("  parallel: the machine's %d CPUs were busy %s of the %s available during that run (%.0f%%):"
        .. " engine %s, systemd %s, the rest fixtures, kernel and bus"):format(par.ncpu, secs(par.machine_busy),
        secs(par.wall * par.ncpu), 100 * par.machine_busy / (par.wall * par.ncpu), secs(par.cpu or 0),
        secs(par.manager_cpu or 0)))
    end
  end
  phase_table(seq, par)
  print()
  lib.flush()
end

-- ---------------------------------------------------------------------------------------
-- Fan-out, N=1000, loading

-- One round: every endpoint probed at once (rr.health.probe over rr.http); seconds, failures,
-- the engine's CPU seconds in the round.
local function fanout_round(list)
  local tasks = {}
  local c0 = job.cpu_ns(fs.getpid())
  local t0 = rr.now()
  for i, s in ipairs(list) do
    tasks[i] = rr.spawn(health.probe, { url = s.url }, 10)
  end
  local fails = 0
  for _, r in ipairs(rr.wait(tasks)) do
    if not (r[1] and r[2] == "healthy") then fails = fails + 1 end
  end
  local dt = rr.now() - t0
  local c1 = job.cpu_ns(fs.getpid())
  return dt, fails, c0 and c1 and (c1 - c0) / 1e9
end

local function bench_fanout(n)
  lib.progress("fan-out: starting %d servers", n)
  local list = spawn_servers(n)
  print(("health fan-out: %d endpoints (%d fixture servers, one endpoint each), rr.health.probe"):format(n, n))
  local rounds, cpus, fails = {}, {}, 0
  for k = 1, ROUNDS do
    lib.progress("fan-out round %d", k)
    local dt, f, cpu = fanout_round(list)
    rounds[k] = dt
    cpus[#cpus + 1] = cpu
    fails = fails + f
  end
  -- Each endpoint alone, one after another: the slowest single answer is the floor of a round.
  local single = {}
  for i, s in ipairs(list) do
    local t0 = rr.now()
    local kind = health.probe({ url = s.url }, 10)
    single[i] = rr.now() - t0
    if kind ~= "healthy" then fails = fails + 1 end
  end
  stop_servers()
  local slowest = lib.max(single)
  lib.row("", 46, { "median", "min", "max" }, { 12, 12, 12 })
  lib.row(("one round, all %d at once (%d rounds)"):format(n, ROUNDS), 46,
    { ms(lib.median(rounds)) .. " ms", ms(lib.min(rounds)) .. " ms", ms(lib.max(rounds)) .. " ms" }, { 12, 12, 12 })
  if #cpus > 0 then
    lib.row("  engine CPU in that round", 46,
      { ms(lib.median(cpus)) .. " ms", ms(lib.min(cpus)) .. " ms", ms(lib.max(cpus)) .. " ms" }, { 12, 12, 12 })
    lib.row("  engine CPU per probe", 46, { ms(lib.median(cpus) / n) .. " ms", ms(lib.min(cpus) / n) .. " ms",
      ms(lib.max(cpus) / n) .. " ms" }, { 12, 12, 12 })
  end
  lib.row("each endpoint alone, one after another", 46,
    { ms(lib.median(single)) .. " ms", ms(lib.min(single)) .. " ms", ms(slowest) .. " ms" }, { 12, 12, 12 })
  print(("  a round takes %.1fx the slowest single endpoint (%s ms vs %s ms); one after another, all %d took %s ms")
    :format(lib.median(rounds) / slowest, ms(lib.median(rounds)), ms(slowest), n, ms(lib.mean(single) * n)))
  if fails > 0 then
    failures = failures + 1
    print(("    !! %d probes were not healthy"):format(fails))
  end
  print()
  results.fanout = { round = lib.median(rounds), slowest = slowest, cpu = lib.median(cpus), n = n }
  lib.flush()
end

local function bench_big_job(p)
  print(("whole job at N=%d (delay 0): rrengine --parallel %d, a first run (it also snapshots every"
    .. " definition)"):format(p.n, PARALLEL))
  job_header()
  local r = run_one(p, "parallel")
  job_row(("rrengine --parallel %d"):format(PARALLEL), r)
  if r.critical_path then
    r.bound = math.max(r.critical_path, r.manager_cpu or 0)
    print(("  DAG bound %s (critical path %s, manager CPU %s): wall %.2fx the bound"):format(secs(r.bound),
      secs(r.critical_path), secs(r.manager_cpu), r.wall / r.bound))
  end
  if r.machine_busy then
    print(("  the machine's %d CPUs were busy %s of the %s available during that run (%.0f%%)"):format(r.ncpu,
      secs(r.machine_busy), secs(r.wall * r.ncpu), 100 * r.machine_busy / (r.wall * r.ncpu)))
  end
  phase_table(nil, r)
  results.big = r
  print()
  lib.flush()
end

local LOAD_CODE = [[
local rr = require("rr")
local services = require("rr.services")
local dag = require("rr.dag")
local path = ...
local t0 = rr.now()
local p = assert(services.load(path))
local t1 = rr.now()
local order = assert(dag.order(p.services))
local t2 = rr.now()
io.write(("load_ms=%.3f order_ms=%.3f n=%d\n"):format((t1 - t0) * 1000, (t2 - t1) * 1000, #order))
]]

local function bench_load(n)
  local path = ("%s/load-%d-services.lua"):format(dir, n)
  local script = ("%s/load.lua"):format(dir)
  platform.write_services_only(path, n)
  assert(fs.write_atomic(script, LOAD_CODE))
  print(("loading, validating and ordering a %d-service file (4 layers; a fresh engine each time, 5 runs)"):format(n))
  local loads, orders, walls, rss = {}, {}, {}, {}
  for k = 1, 5 do
    local tf = ("%s/load.time"):format(dir)
    local t0 = rr.now()
    local res, err = proc.run({ ROOT .. "/build/benchtime", tf, ROOT .. "/rrengine", script, path },
      { cwd = ROOT, timeout = 120 })
    walls[k] = rr.now() - t0
    if not res then
      failures = failures + 1
      print("    !! " .. tostring(err))
      return
    end
    loads[k] = tonumber(res.stdout:match("load_ms=([%d.]+)"))
    orders[k] = tonumber(res.stdout:match("order_ms=([%d.]+)"))
    rss[k] = tonumber((fs.read(tf) or ""):match("maxrss_kb=(%d+)"))
  end
  lib.row("", 46, { "median", "min" }, { 12, 12 })
  lib.row("services.load (read + validate)", 46, { lib.ms(lib.median(loads)) .. " ms", lib.ms(lib.min(loads)) .. " ms" },
    { 12, 12 })
  lib.row("dag.order", 46, { lib.ms(lib.median(orders)) .. " ms", lib.ms(lib.min(orders)) .. " ms" }, { 12, 12 })
  lib.row("whole process (spawn to exit)", 46, { ms(lib.median(walls)) .. " ms", ms(lib.min(walls)) .. " ms" },
    { 12, 12 })
  lib.row("peak RSS of that process", 46, { mb(lib.median(rss)), mb(lib.min(rss)) }, { 12, 12 })
  results.load = { load = lib.median(loads), order = lib.median(orders) }
  print()
  lib.flush()
end

-- ---------------------------------------------------------------------------------------
-- Summary

local function summary()
  print("targets (figures, not assertions)")
  local function line(what, value, target, ok)
    lib.row(what, 60, { value, target, ok == nil and "-" or (ok and "met" or "NOT met") }, { 14, 12, 9 })
  end
  for _, s in ipairs(SIZES) do
    local res = results[("n%d"):format(s.n)]
    if res then
      local seq, par, shell = res.sequential, res.parallel, res.shell
      if seq and seq.overhead then
        line(("N=%d sequential overhead per service"):format(s.n), lib.ms(seq.overhead * 1000) .. " ms", "<= 5 ms",
          seq.overhead <= 0.005)
      end
      if shell and shell.overhead then
        line(("N=%d   (shell loop, same measure)"):format(s.n), lib.ms(shell.overhead * 1000) .. " ms", "", nil)
      end
      if par and par.bound then
        line(("N=%d parallel wall / max(critical path, manager CPU)"):format(s.n), ("%.2fx"):format(par.wall / par.bound),
          "<= 1.15x", par.wall / par.bound <= 1.15)
      end
      for _, r in ipairs({ seq, par }) do
        if r and r.cpu then
          line(("N=%d %s engine CPU per service"):format(s.n, r.method), lib.ms(r.cpu / r.n * 1000) .. " ms", "<= 3 ms",
            r.cpu / r.n <= 0.003)
        end
      end
    end
  end
  local big = results.big
  if big then
    line(("N=%d parallel engine CPU per service"):format(big.n), lib.ms(big.cpu / big.n * 1000) .. " ms", "<= 3 ms",
      big.cpu / big.n <= 0.003)
    line(("N=%d peak RSS (whole job)"):format(big.n), mb(big.maxrss_kb), "<= 16 MB", big.maxrss_kb <= 16 * 1024)
    if big.bound then
      line(("N=%d parallel wall / max(critical path, manager CPU)"):format(big.n), ("%.2fx"):format(big.wall / big.bound),
        "<= 1.15x", big.wall / big.bound <= 1.15)
    end
  end
  print()
end

-- ---------------------------------------------------------------------------------------
-- Main

local function header()
  local kernel = first_line(fs.read("/proc/sys/kernel/osrelease"))
  local sd = proc.run({ "systemctl", "--version" }, { timeout = 10 })
  local cpus = 0
  local info = fs.read("/proc/cpuinfo") or ""
  for _ in info:gmatch("\nprocessor%s*:") do cpus = cpus + 1 end
  if info:match("^processor%s*:") then cpus = cpus + 1 end
  local load = first_line(fs.read("/proc/loadavg"))
  print("rrengine bench: the whole job, in a sandboxed systemd user manager, 127.0.0.1 only")
  print(("  kernel %s, %d CPUs, %s, load average at start %s"):format(kernel, cpus, first_line(sd and sd.stdout),
    load:match("^(%S+ %S+ %S+)") or "?"))
  print("  CPU = user+sys from wait4() of the child (and its children); manager CPU from /proc/PID/schedstat of the"
    .. " sandbox's systemd --user during the run")
  print()
  lib.flush()
end

local function main()
  local t_start = rr.now()
  header()
  m = assert(systemd.user())
  dir = assert(fs.mkdtemp("/tmp/rrbench."))
  for _, sz in ipairs(SIZES) do
    if interrupted() then break end
    local ok = lib.section(("whole job N=%d"):format(sz.n), function()
      local p = setup({ label = ("n%d"):format(sz.n), n = sz.n, delay = sz.delay })
      bench_size(p)
      teardown(p)
    end)
    if not ok then failures = failures + 1 end
  end
  if FANOUT > 0 and not interrupted() then
    if not lib.section("fan-out", function() bench_fanout(FANOUT) end) then failures = failures + 1 end
    stop_servers()
  end
  if BIG and FANOUT > 0 and not interrupted() then
    local ok = lib.section("whole job N=" .. FANOUT, function()
      local p = setup({ label = ("n%d"):format(FANOUT), n = FANOUT, delay = 0 })
      bench_big_job(p)
      teardown(p)
    end)
    if not ok then failures = failures + 1 end
  end
  if not interrupted() and not lib.section("load", function() bench_load(FANOUT > 0 and FANOUT or 1000) end) then
    failures = failures + 1
  end
  summary()
  if interrupted() then
    print("interrupted: remaining figures skipped")
    failures = failures + 1
  end
  print(("total bench time %.1f s"):format(rr.now() - t_start))
end

local ok, err = xpcall(main, debug.traceback)
if not ok then
  print("bench failed: " .. first_line(tostring(err)))
  io.stderr:write(tostring(err), "\n")
  failures = failures + 1
end
lib.progress("cleanup")
local cok, cerr = xpcall(cleanup, debug.traceback)
if not cok then
  print("cleanup failed: " .. tostring(cerr))
  failures = failures + 1
end
if failures > 0 then
  print(("bench finished with %d failure(s): the figures marked above are not reliable"):format(failures))
end
io.stdout:flush()
os.exit(failures == 0 and 0 or 1)
