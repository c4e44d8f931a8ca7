-- bench/job.lua: one timed run of the whole job on a generated platform (bench/platform.lua),
-- checked against systemd's own timestamps and the fixtures' ready files, and taken apart
-- into phases from the run's event log.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local cjson = require("cjson")
local platform = require("bench.platform")

local job = {}

-- CPU nanoseconds a process has run so far: /proc/PID/schedstat's first field (ns, exact);
-- else utime+stime from /proc/PID/stat (clock ticks, assumed 100 Hz: 10 ms steps). nil if
-- the process is unknown.
function job.cpu_ns(pid)
  if not pid then return nil end
  local sched = fs.read("/proc/" .. pid .. "/schedstat")
  local ns = sched and tonumber(sched:match("^(%d+)"))
  if ns then return ns end
  local stat = fs.read("/proc/" .. pid .. "/stat")
  local rest = stat and stat:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  local ut, st = tonumber(f[12]), tonumber(f[13])
  return ut and st and (ut + st) * 10000000 or nil
end

-- "2026-12-03T09:24:48.759Z" -> seconds since the epoch (UTC, no time zone involved).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

function job.parse_ts(ts)
  local y, mo, d, h, mi, s, frac = ts:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.?(%d*)Z$")
  if not y then return nil end
  local t = days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  if frac ~= "" then t = t + tonumber(frac) / 10 ^ #frac end
  return t
end

local function parse_benchtime(path)
  local text = fs.read(path)
  if not text then return nil end
  local r = {}
  for k, v in text:gmatch("([%w_]+)=(%-?%d+)") do r[k] = tonumber(v) end
  return r
end

-- Every unit's properties, read concurrently.
local function read_props(m, p)
  local tasks = {}
  for i, u in ipairs(p.units) do
    tasks[i] = rr.spawn(function()
      local unit = assert(m:unit(u.unit))
      return assert(unit:properties())
    end)
  end
  local props = {}
  for i, r in ipairs(rr.wait(tasks)) do
    if not r[1] then error(("cannot read %s: %s"):format(p.units[i].unit, tostring(r[2]))) end
    props[i] = r[2]
  end
  return props
end

-- The run's facts per unit, in seconds of CLOCK_MONOTONIC (rr.now()'s clock; the sandbox has
-- no time namespace): stop began (ActiveExitTimestamp), main process exec'd, active, healthy
-- (the fixture's ready file). Plus the realtime - monotonic offset, to place the events.
local function facts(m, p)
  local props = read_props(m, p)
  local f, offsets = {}, {}
  for i, u in ipairs(p.units) do
    local pr = props[i]
    local ready_us, ready_pid = platform.read_ready(u)
    f[i] = {
      exit = (pr.ActiveExitTimestampMonotonic or 0) / 1e6,
      exec = (pr.ExecMainStartTimestampMonotonic or 0) / 1e6,
      active = (pr.ActiveEnterTimestampMonotonic or 0) / 1e6,
      ready = ready_us and ready_us / 1e6,
      ready_pid = ready_pid,
      main_pid = pr.MainPID,
      state = pr.ActiveState,
    }
    if (pr.ActiveEnterTimestamp or 0) > 0 and (pr.ActiveEnterTimestampMonotonic or 0) > 0 then
      offsets[#offsets + 1] = (pr.ActiveEnterTimestamp - pr.ActiveEnterTimestampMonotonic) / 1e6
    end
  end
  table.sort(offsets)
  return f, offsets[(#offsets + 1) // 2]
end

-- Checks one run against the timestamps: every unit restarted during the run (stopped and
-- exec'd after it began), active, healthy (by its ready file, written by the running process)
-- before the run ended, and never touched before each of its dependencies was healthy.
-- Returns a list of problems (empty: verified).
local function verify(p, f, t0, t1)
  local problems = {}
  local function problem(fmt, ...)
    if #problems < 8 then problems[#problems + 1] = fmt:format(...) end
    problems.count = (problems.count or 0) + 1
  end
  for i, u in ipairs(p.units) do
    local x = f[i]
    if x.exit < t0 or x.exec < t0 then
      problem("%s was not restarted during the run (stop at %.3f, exec at %.3f, run began %.3f)", u.unit,
        x.exit, x.exec, t0)
    end
    if x.state ~= "active" then problem("%s is %s after the run", u.unit, tostring(x.state)) end
    if not x.ready then
      problem("%s: no ready file", u.unit)
    else
      if x.ready_pid ~= x.main_pid then
        problem("%s: ready file from pid %s, MainPID is %s", u.unit, tostring(x.ready_pid), tostring(x.main_pid))
      end
      if x.ready > t1 then problem("%s became healthy only after the run ended", u.unit) end
      -- (not against ExecMainStartTimestamp: the manager takes it in the parent after fork(), and
      -- on a busy machine the child can exec and listen before that)
      if x.ready < x.exit then problem("%s: healthy before its stop began", u.unit) end
    end
    for _, d in ipairs(u.deps) do
      local dr = f[d].ready
      if dr and x.exit < dr then
        problem("%s was stopped %.1f ms before its dependency %s was healthy", u.unit, (dr - x.exit) * 1000,
          p.units[d].unit)
      end
    end
  end
  problems.count = problems.count or 0
  return problems
end

-- The longest path through the graph, each unit weighing its own stop-to-healthy time.
local function critical_path(p, f)
  local cp, best = {}, 0
  for i, u in ipairs(p.units) do -- 1..n is a topological order
    local before = 0
    for _, d in ipairs(u.deps) do before = math.max(before, cp[d]) end
    cp[i] = before + (f[i].ready - f[i].exit)
    best = math.max(best, cp[i])
  end
  return best
end

-- Per-phase means (ms per service) from the event log.
local function phases(p, events_path, f, offset, t0, t1)
  local by_name = {}
  for i, u in ipairs(p.units) do by_name[u.name] = i end
  local per = {}
  local plan_start, plan_end
  local text = fs.read(events_path)
  if not text then return nil end
  for line in text:gmatch("[^\n]+") do
    local ok, ev = pcall(cjson.decode, line)
    if ok and type(ev) == "table" and ev.ts then
      local t = job.parse_ts(ev.ts) - offset
      if ev.event == "PLAN_START" then
        plan_start = t
      elseif ev.event == "PLAN_END" then
        plan_end = t
      elseif ev.service and by_name[ev.service] then
        local i = by_name[ev.service]
        local e = per[i] or {}
        per[i] = e
        if ev.event == "SERVICE_RESTART_START" then
          e.start = t
        elseif ev.event == "HEALTH_CHECK_PASSED" and ev.phase == "pre" then
          e.pre = t
        elseif ev.event == "UNIT_RESTART" or ev.event == "UNIT_RELOAD" then
          e.job_start = t
        elseif ev.event == "UNIT_JOB_DONE" then
          e.job_done = t
        elseif ev.event == "HEALTH_CHECK_PASSED" and ev.phase == "post" then
          e.post = t
        elseif ev.event == "SERVICE_RESTART_SUCCESS" then
          e.success = t
        end
      end
    end
  end
  local sums, counts = {}, {}
  local function add(k, v)
    if v then
      sums[k] = (sums[k] or 0) + v
      counts[k] = (counts[k] or 0) + 1
    end
  end
  local order = {}
  for i, e in pairs(per) do
    if e.start then order[#order + 1] = { i = i, start = e.start, success = e.success } end
  end
  table.sort(order, function(a, b) return a.start < b.start end)
  for i, e in pairs(per) do
    local x = f[i]
    local function d(a, b) return a and b and (b - a) * 1000 or nil end
    add("pre", d(e.start, e.pre))
    add("def", d(e.pre, e.job_start))
    add("job", d(e.job_start, e.job_done))
    add("job_systemd", d(x.exit, x.active))
    add("to_ready", d(e.job_done, x.ready))
    add("lag", d(x.ready, e.post))
    add("after_post", d(e.post, e.success))
  end
  -- Only one at a time does a service start when the one before it succeeded.
  local one_by_one = true
  for k = 2, #order do
    if not order[k - 1].success or order[k].start < order[k - 1].success then one_by_one = false end
  end
  for k = 2, one_by_one and #order or 0 do
    add("between", (order[k].start - order[k - 1].success) * 1000)
  end
  local mean = {}
  for k, s in pairs(sums) do mean[k] = s / counts[k] end
  mean.startup = plan_start and (plan_start - t0) * 1000
  mean.first = order[1] and plan_start and (order[1].start - plan_start) * 1000
  mean.shutdown = plan_end and (t1 - plan_end) * 1000
  mean.services = #order
  if one_by_one and #order > 0 then
    -- the rows add up to the wall time per service (job_systemd and to_ready overlap job/lag)
    local n = #order
    mean.sum = ((mean.startup or 0) + (mean.first or 0) + (mean.shutdown or 0)) / n + (mean.pre or 0)
      + (mean.def or 0) + (mean.job or 0) + (mean.to_ready or 0) + (mean.lag or 0) + (mean.after_post or 0)
      + (mean.between or 0) * (n - 1) / n
  end
  return mean
end

-- job.run{ p, method = "sequential"|"parallel"|"shell", parallel = N, m = manager, root, dir,
--   manager_pid, wrap = {argv words before the engine's} } -> result table (see run.lua for the fields it prints).
-- The whole machine's CPU time so far, from /proc/stat: busy seconds (everything but idle and
-- iowait) and the number of CPUs. Tells whether a run was bound by the machine rather than by
-- systemd's one thread.
function job.machine_cpu()
  local text = fs.read("/proc/stat")
  if not text then return nil end
  local ticks = {}
  for v in (text:match("^cpu%s+([^\n]+)") or ""):gmatch("%d+") do ticks[#ticks + 1] = tonumber(v) end
  local n = 0
  for _ in text:gmatch("\ncpu%d+") do n = n + 1 end
  if #ticks < 5 or n == 0 then return nil end
  local total = 0
  for i = 1, math.min(#ticks, 8) do total = total + ticks[i] end
  local hz = 100 -- USER_HZ: /proc/stat counts in 1/100 s on Linux
  return (total - ticks[4] - ticks[5]) / hz, n
end

function job.run(o)
  local p = o.p
  local tag = ("%s-%s"):format(p.label, o.method)
  local timefile = ("%s/%s.time"):format(o.dir, tag)
  local events = ("%s/%s-events.jsonl"):format(o.dir, tag)
  local argv = { o.root .. "/build/benchtime", timefile }
  if o.method == "shell" then
    argv[#argv + 1] = "/bin/bash"
    argv[#argv + 1] = p.script
  else
    for _, a in ipairs(o.wrap or {}) do argv[#argv + 1] = a end
    for _, a in ipairs({ o.root .. "/rrengine", o.root .. "/plans/rolling.lua", "--user",
      "--services", p.services_file, "--events", events }) do argv[#argv + 1] = a end
    if o.method == "parallel" then
      argv[#argv + 1] = "--parallel"
      argv[#argv + 1] = tostring(o.parallel)
    end
  end
  fs.remove(events)
  for _, u in ipairs(p.units) do fs.remove(u.ready_file) end
  local mgr0 = job.cpu_ns(o.manager_pid)
  local busy0, ncpu = job.machine_cpu()
  local t0 = rr.now()
  local res, err, _, r = proc.run(argv, { cwd = o.root, timeout = 600, max_capture = 4 * 1024 * 1024 })
  local t1 = rr.now()
  local mgr1 = job.cpu_ns(o.manager_pid)
  local busy1 = job.machine_cpu()
  local out = { label = p.label, method = o.method, n = p.n, delay = p.delay, wall = t1 - t0, argv = argv }
  if busy0 and busy1 then out.machine_busy, out.ncpu = busy1 - busy0, ncpu end
  if not res then
    local detail = type(r) == "table" and ((r.stderr or "") .. (r.stdout or "")):sub(-600) or ""
    out.error = ("%s: %s"):format(tostring(err), detail)
  end
  local bt = parse_benchtime(timefile)
  if bt then
    out.cpu = (bt.user_us + bt.sys_us) / 1e6
    out.user, out.sys = bt.user_us / 1e6, bt.sys_us / 1e6
    out.maxrss_kb = bt.maxrss_kb
  end
  out.manager_cpu = mgr0 and mgr1 and (mgr1 - mgr0) / 1e9
  local f, offset = facts(o.m, p)
  out.problems = verify(p, f, t0, t1)
  local irreducible = 0
  local jobs = 0
  for i = 1, p.n do
    if f[i].ready and f[i].exit > 0 then irreducible = irreducible + (f[i].ready - f[i].exit) end
    jobs = jobs + (f[i].active - f[i].exit)
  end
  out.irreducible = irreducible -- sum of stop-to-healthy times: what a perfect sequential runner waits
  out.job_systemd = jobs / p.n
  out.critical_path = out.problems.count == 0 and critical_path(p, f) or nil
  if o.method ~= "shell" and offset then
    out.phases = phases(p, events, f, offset, t0, t1)
  end
  return out
end

return job
