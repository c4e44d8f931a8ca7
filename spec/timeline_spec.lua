-- rr.timeline and plans/timeline.lua: a run of the event log drawn as an SVG Gantt chart.
-- The model is checked on hand-written events (every outcome, a run cut short); the plan on the
-- events of real runs against the sandboxed manager (two services in parallel, then a broken
-- deploy rolled back), its SVG parsed by xmllint.
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")
local timeline = require("rr.timeline")
local cjson = require("cjson")

-- An events file from { {ms_from_start, EVENT, fields}... } for run `run`.
local function events_of(run, list, base)
  base = base or timeline.parse_ts("2026-03-01T10:00:00.000Z")
  local out = {}
  for _, e in ipairs(list) do
    local ms = base + e[1]
    local secs = ms // 1000
    local ev = { ts = os.date("!%Y-%m-%dT%H:%M:%S", secs) .. (".%03dZ"):format(ms % 1000), event = e[2], run = run }
    for k, v in pairs(e[3] or {}) do ev[k] = v end
    out[#out + 1] = ev
  end
  return out
end

local function span_of(row, phase)
  for _, s in ipairs(row.spans) do
    if s.phase == phase then return s end
  end
end

local function row_of(model, name)
  for _, r in ipairs(model.rows) do
    if r.service == name then return r end
  end
end

local function phases(row)
  local list = {}
  for _, s in ipairs(row.spans) do list[#list + 1] = s.phase end
  return list
end

-- xmllint --xpath EXPR FILE -> its output (string) | nil, stderr
local function xpath(file, expr)
  local res, _, _, r = proc.run({ "xmllint", "--xpath", expr, file })
  if not res then return nil, (r and r.stderr) or "xmllint failed" end
  return (res.stdout:gsub("%s+$", ""))
end

local function el(name) return "*[local-name()='" .. name .. "']" end

-- A failed deploy of "api", rolled back; "db" restarted fine before it.
local FAILED_DEPLOY = {
  { 0, "PLAN_START", { order = { "db", "api" }, parallel = 1 } },
  { 1, "SERVICE_RESTART_START", { service = "db", unit = "db.service" } },
  { 3, "HEALTH_CHECK_PASSED", { service = "db", phase = "pre", duration_ms = 2 } },
  { 4, "UNIT_RESTART", { service = "db" } },
  { 20, "UNIT_JOB_DONE", { service = "db", method = "restart", duration_ms = 16 } },
  { 25, "HEALTH_CHECK_PASSED", { service = "db", phase = "post", duration_ms = 5 } },
  { 25, "STABILIZE_START", { service = "db", seconds = 1 } },
  { 1025, "STABILIZE_END", { service = "db", seconds = 1 } },
  { 1030, "HEALTH_CHECK_PASSED", { service = "db", phase = "final", duration_ms = 5 } },
  { 1031, "SERVICE_RESTART_SUCCESS", { service = "db", method = "restart", duration_ms = 1030 } },
  { 1032, "SERVICE_RESTART_START", { service = "api", unit = "api.service" } },
  { 1040, "HEALTH_CHECK_PASSED", { service = "api", phase = "pre", duration_ms = 8 } },
  { 1041, "DEPLOY_START", { service = "api", source = "/tmp/rel" } },
  { 1141, "DEPLOY_END", { service = "api", created = 1, replaced = 2, duration_ms = 100 } },
  { 1141, "MIGRATION_START", { service = "api", command = { "migrate" } } },
  { 1200, "MIGRATION_END", { service = "api", exit_code = 0, duration_ms = 59 } },
  { 1300, "DAEMON_RELOAD", { service = "api" } },
  { 1301, "UNIT_RELOAD", { service = "api" } },
  { 1311, "UNIT_JOB_FAILED", { service = "api", method = "reload", duration_ms = 10, error = "reload failed" } },
  { 1311, "RELOAD_FALLBACK", { service = "api", error = "reload failed" } },
  { 1330, "UNIT_JOB_DONE", { service = "api", method = "restart", duration_ms = 19 } },
  { 1400, "HEALTH_CHECK_FAILED", { service = "api", phase = "post", duration_ms = 70, error = "HTTP 500" } },
  { 1400, "ROLLBACK_START", { service = "api", reason = "unhealthy" } },
  { 1405, "UNIT_JOB_DONE", { service = "api", method = "stop", duration_ms = 5 } },
  { 1500, "UNIT_JOB_DONE", { service = "api", method = "start", duration_ms = 9 } },
  { 1510, "HEALTH_CHECK_PASSED", { service = "api", phase = "rollback", duration_ms = 10 } },
  { 1511, "ROLLBACK_SUCCESS", { service = "api", duration_ms = 111 } },
  { 1512, "SERVICE_RESTART_FAILED", { service = "api", error = "unhealthy after restart: HTTP 500", rolled_back = true } },
  { 1513, "PLAN_END", { result = "failed", exit_code = 1 } },
}

describe("rr.timeline", function()
  it("parse_ts reads RFC 3339 (Z and offsets, any fraction) and refuses anything else", function()
    assert.equal(0, timeline.parse_ts("1970-01-01T00:00:00Z"))
    assert.equal(1772359200123, timeline.parse_ts("2026-03-01T10:00:00.123Z"))
    assert.equal(timeline.parse_ts("2026-03-01T10:00:00.5Z"), timeline.parse_ts("2026-03-01T11:00:00.500+01:00"))
    assert.equal(951782400000, timeline.parse_ts("2000-02-29T00:00:00.000Z")) -- a leap day
    for _, bad in ipairs({ "2026-03-01", "2026-13-01T00:00:00Z", "2026-03-01T10:00:00", "2026-03-01T10:00:00.Z",
                           "yesterday", 12 }) do
      assert.is_nil(timeline.parse_ts(bad), tostring(bad))
    end
  end)

  it("a failed deploy: every phase of the flow as a span, the failure marked, the rollback drawn", function()
    local model = assert(timeline.build(events_of("r1", FAILED_DEPLOY)))
    assert.equal("r1", model.run)
    assert.equal(1513, model.duration)
    assert.equal("failed", model.result)
    assert.equal(1, model.exit_code)
    assert.equal(2, #model.rows)
    local db, api = model.rows[1], model.rows[2]
    assert.equal("db", db.service)
    assert.equal("ok", db.outcome)
    assert.same({ "pre-check", "restart", "post-check", "stabilize", "post-check" }, phases(db))
    assert.same({ from = 4, to = 20 }, { from = span_of(db, "restart").from, to = span_of(db, "restart").to })
    assert.same({ 25, 1025 }, { span_of(db, "stabilize").from, span_of(db, "stabilize").to })

    assert.equal("rolled back", api.outcome)
    assert.equal("unhealthy after restart: HTTP 500", api.error)
    assert.same({ "pre-check", "deploy", "migrate", "daemon-reload", "reload", "restart", "post-check", "rollback" },
      phases(api))
    assert.same({ 1041, 1141 }, { span_of(api, "deploy").from, span_of(api, "deploy").to })
    assert.equal("from /tmp/rel; 1 created, 2 replaced", span_of(api, "deploy").detail)
    assert.same({ 1200, 1300 }, { span_of(api, "daemon-reload").from, span_of(api, "daemon-reload").to })
    assert.is_true(span_of(api, "reload").failed)
    assert.is_true(span_of(api, "post-check").failed)
    assert.is_nil(span_of(api, "restart").failed)
    assert.same({ 1400, 1511 }, { span_of(api, "rollback").from, span_of(api, "rollback").to })
    -- the rollback's own stop, start and health check are inside its span, not restarts of their own
    local restarts = 0
    for _, s in ipairs(api.spans) do if s.phase == "restart" then restarts = restarts + 1 end end
    assert.equal(1, restarts)
    local texts = {}
    for _, m in ipairs(api.marks) do texts[#texts + 1] = m.text end
    assert.same({ "UNIT_JOB_FAILED: reload failed", "RELOAD_FALLBACK: reload failed", "HEALTH_CHECK_FAILED: HTTP 500" }, texts)
    assert.equal(1, model.max_parallel)
  end)

  it("services in flight together overlap, and max_parallel counts them", function()
    local model = assert(timeline.build(events_of("par", {
      { 0, "PLAN_START", { order = { "a", "b", "c" }, parallel = 2 } },
      { 0, "SERVICE_RESTART_START", { service = "a" } },
      { 1, "SERVICE_RESTART_START", { service = "b" } },
      { 10, "UNIT_JOB_DONE", { service = "a", method = "restart", duration_ms = 8 } },
      { 12, "UNIT_JOB_DONE", { service = "b", method = "restart", duration_ms = 9 } },
      { 500, "SERVICE_RESTART_SUCCESS", { service = "a" } },
      { 501, "SERVICE_RESTART_START", { service = "c" } },
      { 600, "SERVICE_RESTART_SUCCESS", { service = "b" } },
      { 700, "UNIT_JOB_DONE", { service = "c", method = "restart", duration_ms = 50 } },
      { 701, "SERVICE_RESTART_SUCCESS", { service = "c" } },
      { 702, "PLAN_END", { result = "success", exit_code = 0 } },
    })))
    assert.equal(2, model.max_parallel)
    assert.equal(2, model.parallel)
    local a, b = row_of(model, "a"), row_of(model, "b")
    assert.is_true(b.from < a.to and a.from < b.to)
  end)

  it("a run cut short: the open step is drawn to the service's last event, unfinished; the rest not started", function()
    local model = assert(timeline.build(events_of("cut", {
      { 0, "PLAN_START", { order = { "a", "b" } } },
      { 0, "SERVICE_RESTART_START", { service = "a" } },
      { 5, "HEALTH_CHECK_PASSED", { service = "a", phase = "pre", duration_ms = 5 } },
      { 6, "MIGRATION_START", { service = "a", command = { "sleep", "600" } } },
      { 900, "MIGRATION_OUTPUT", { service = "a", line = "step 3" } },
      { 950, "INTERRUPTED", { signal = "SIGTERM" } },
    })))
    assert.is_false(model.finished)
    assert.is_nil(model.result)
    local a, b = row_of(model, "a"), row_of(model, "b")
    assert.equal("unfinished", a.outcome)
    local m = span_of(a, "migrate")
    assert.is_true(m.open)
    assert.same({ 6, 900 }, { m.from, m.to })
    assert.equal("not started", b.outcome)
    assert.same({ { at = 950, signal = "SIGTERM" } }, model.interrupts)
    local svg = timeline.svg(model)
    assert.matches('class="span phase%-migrate open"', svg)
    assert.matches("interrupted %(SIGTERM%)", svg)
    assert.matches("unfinished %(no PLAN_END", svg)
  end)

  it("a failed rollback, a service not touched and a skipped one each have their outcome", function()
    local model = assert(timeline.build(events_of("bad", {
      { 0, "SERVICE_RESTART_START", { service = "a" } },
      { 10, "ROLLBACK_START", { service = "a" } },
      { 20, "ROLLBACK_FAILED", { service = "a", error = "start failed" } },
      { 21, "SERVICE_RESTART_FAILED", { service = "a", rolled_back = false, rollback_error = "start failed" } },
      { 22, "SERVICE_RESTART_START", { service = "b" } },
      { 30, "HEALTH_CHECK_FAILED", { service = "b", phase = "pre", duration_ms = 8, error = "refused" } },
      { 31, "SERVICE_RESTART_FAILED", { service = "b", touched = false, error = "pre-check failed" } },
      { 32, "SERVICE_SKIPPED", { service = "c", reason = "a dependency failed" } },
      { 33, "PLAN_END", { result = "failed", exit_code = 3 } },
    })))
    assert.equal("rollback failed", row_of(model, "a").outcome)
    assert.is_true(span_of(row_of(model, "a"), "rollback").failed)
    assert.equal("failed", row_of(model, "b").outcome)
    assert.is_true(span_of(row_of(model, "b"), "pre-check").failed)
    assert.equal("skipped", row_of(model, "c").outcome)
    assert.equal(0, #row_of(model, "c").spans)
    assert.equal(3, model.exit_code)
  end)

  it("picks the last run, a run by a unique prefix, and refuses an ambiguous or unknown one", function()
    local list = events_of("abc-1", { { 0, "SERVICE_RESTART_START", { service = "x" } } })
    for _, ev in ipairs(events_of("abd-2", { { 5000, "SERVICE_RESTART_START", { service = "y" } } })) do list[#list + 1] = ev end
    assert.equal("abd-2", assert(timeline.build(list)).run)
    assert.equal("abc-1", assert(timeline.build(list, "abc")).run)
    assert.equal("abc-1", assert(timeline.build(list, "abc-1")).run)
    local m, err, code = timeline.build(list, "ab")
    assert.is_nil(m)
    assert.equal("EAMBIGUOUS", code)
    assert.matches("ambiguous", err)
    m, err, code = timeline.build(list, "zzz")
    assert.is_nil(m)
    assert.equal("ENORUN", code)
    assert.matches('no run "zzz"', err)
    m, _, code = timeline.build({})
    assert.is_nil(m)
    assert.equal("ENORUN", code)
    assert.has_error(function() timeline.build("events.jsonl") end)
  end)

  it("draws text safely: markup, control characters and broken UTF-8 in an error stay well-formed", function()
    local dir = assert(fs.mkdtemp("/tmp/rr-timeline-"))
    local model = assert(timeline.build(events_of("x<&>", {
      { 0, "SERVICE_RESTART_START", { service = "a&b<c>" } },
      { 10, "HEALTH_CHECK_FAILED", { service = "a&b<c>", phase = "pre", duration_ms = 5,
        error = "got \"<html>\" & \1\2 bytes \255\254 ]]>" } },
    })))
    local file = helpers.write(dir .. "/t.svg", timeline.svg(model))
    local res, _, _, r = proc.run({ "xmllint", "--noout", file })
    fs.remove_tree(dir)
    assert.is_truthy(res, r and r.stderr)
  end)
end)

describe("plans/timeline.lua on real runs", function()
  local p, release, svg_dir
  local function timeline_cli(args)
    local argv = { helpers.engine, "plans/timeline.lua" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local res, _, _, r = proc.run(argv, { timeout = 30 })
    return res or r
  end

  setup(function()
    p = platform.new({
      { name = "a", http = true, stabilize = 1 },
      { name = "b", http = true, code = true, stabilize = 1, migrate = { "/bin/sh", "-c", "echo migrating" } },
      { name = "c", depends = { "a" } },
    })
    p:start()
    svg_dir = assert(fs.mkdtemp("/tmp/rr-timeline-svg-"))
    -- run 1: a and b in parallel, then c
    local res = p:cli({ "--parallel", "2" })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    -- run 2: a release of b that answers 500: deployed, migrated, restarted, rolled back
    release = p.dir .. "/release"
    helpers.write(release .. "/version", "v2\n")
    helpers.write(release .. "/b.control", "status=500\n")
    res = p:cli({ "--service", "b", "--deploy", "--deploy-path", release })
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
  end)
  teardown(function()
    p:teardown()
    fs.remove_tree(svg_dir)
  end)

  it("draws the last run by default: well-formed SVG, b's flow with the failed check and the rollback", function()
    local out = svg_dir .. "/last.svg"
    local res = timeline_cli({ p.events_file, "-o", out })
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stdout)
    assert.matches("drawn in " .. out:gsub("%p", "%%%0"), res.stderr)
    local ok, _, _, r = proc.run({ "xmllint", "--noout", out })
    assert.is_truthy(ok, r and r.stderr)
    assert.equal("1", xpath(out, "count(//" .. el("g") .. "[@class='row'])"))
    local row = "//" .. el("g") .. "[@class='row'][@data-service='b'][@data-outcome='rolled back']"
    for _, phase in ipairs({ "pre-check", "deploy", "migrate", "restart", "rollback" }) do
      assert.equal("1", xpath(out, ("count(%s/%s[contains(@class,'phase-%s')])"):format(row, el("rect"), phase)), phase)
    end
    assert.equal("1", xpath(out, ("count(%s/%s[contains(@class,'phase-post-check')][contains(@class,'failed')])"):format(row, el("rect"))))
    assert.is_true(tonumber(xpath(out, ("count(%s/%s[@class='mark'])"):format(row, el("path")))) >= 1)
  end)

  it("--run draws the parallel run: a and b overlap, two in flight, on stdout", function()
    local events = {}
    for line in assert(fs.read(p.events_file)):gmatch("[^\n]+") do events[#events + 1] = cjson.decode(line) end
    local runs = timeline.runs(events)
    assert.equal(2, #runs)
    local model = assert(timeline.build(events, runs[1].id))
    assert.equal(2, model.max_parallel)
    local a, b = row_of(model, "a"), row_of(model, "b")
    assert.is_true(b.from < a.to and a.from < b.to, "a and b did not overlap")
    assert.equal("ok", row_of(model, "c").outcome)

    local res = timeline_cli({ p.events_file, "--run", runs[1].id:sub(1, 8) })
    assert.equal(0, res.exit_code, res.stderr)
    local out = helpers.write(svg_dir .. "/first.svg", res.stdout)
    local ok, _, _, r = proc.run({ "xmllint", "--noout", out })
    assert.is_truthy(ok, r and r.stderr)
    assert.equal("3", xpath(out, "count(//" .. el("g") .. "[@class='row'][@data-outcome='ok'])"))
    local two = "count(//" .. el("g") .. "[@class='in-flight']/" .. el("rect")
      .. "[starts-with(" .. el("title") .. ", '2 in flight')])"
    assert.is_true(tonumber(xpath(out, two)) >= 1)
  end)

  it("--list names every run with its result", function()
    local res = timeline_cli({ p.events_file, "--list" })
    assert.equal(0, res.exit_code, res.stderr)
    local lines = {}
    for line in res.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(2, #lines)
    assert.matches("^%x+%-[%x-]+  %d%d%d%d%-%d%d%-%d%dT[%d:.]+Z  success%s+3 service%(s%)", lines[1])
    assert.matches("failed%s+1 service%(s%)", lines[2])
  end)

  it("refuses what it cannot draw with exit 2 and one line, and writes no picture", function()
    local torn = helpers.write(svg_dir .. "/torn.jsonl", assert(fs.read(p.events_file)) .. '{"ts":"2026-')
    local cases = {
      { { svg_dir .. "/missing.jsonl" }, "cannot read the events file .*missing%.jsonl: No such file" },
      { { svg_dir }, "cannot read the events file .*: Is a directory" },
      { { p.events_file, "--run", "nosuchrun" }, 'no run "nosuchrun"' },
      { { p.events_file, "extra.jsonl" }, 'unexpected argument "extra.jsonl"' },
      { { p.events_file, "--width", "12" }, "%-%-width must be an integer from 500" },
      { { p.events_file, "--frob" }, "unknown option %-%-frob" },
      { { p.events_file, "-o", svg_dir .. "/no/such/dir/x.svg" }, "cannot write .*x%.svg" },
      { { helpers.write(svg_dir .. "/empty.jsonl", "") }, "holds no run" },
    }
    for _, case in ipairs(cases) do
      local res = timeline_cli(case[1])
      assert.equal(2, res.exit_code, table.concat(case[1], " "))
      assert.matches("^rrengine: [^\n]*" .. case[2] .. "[^\n]*\n$", res.stderr)
      assert.equal("", res.stdout)
    end
    -- a torn last line (the engine killed mid-write) is skipped and said, the rest drawn
    local res = timeline_cli({ torn, "-o", svg_dir .. "/torn.svg" })
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("1 line%(s%) are not events and were skipped", res.stderr)
    assert.is_truthy(fs.stat(svg_dir .. "/torn.svg"))
  end)
end)

describe("plans/graph.lua --svg", function()
  local dir, services
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-graph-svg-"))
    services = helpers.write(dir .. "/services.lua", [[
      return { services = {
        { name = "db", unit = "db.service" },
        { name = "cache", unit = "cache.service" },
        { name = "api", unit = "api.service", depends = { "db", "cache" } },
      } }]])
  end)
  teardown(function() fs.remove_tree(dir) end)

  local function graph(args, env)
    local argv = { helpers.engine, "plans/graph.lua", "--services", services }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local res, _, _, r = proc.run(argv, { timeout = 60, env = env })
    return res or r
  end

  it("draws the dependencies with Graphviz's dot: one node per service, one edge per dependency", function()
    local res = graph({ "--svg" })
    assert.equal(0, res.exit_code, res.stderr)
    local out = helpers.write(dir .. "/graph.svg", res.stdout)
    local ok, _, _, r = proc.run({ "xmllint", "--noout", out })
    assert.is_truthy(ok, r and r.stderr)
    assert.equal("3", xpath(out, "count(//" .. el("g") .. "[@class='node'])"))
    assert.equal("2", xpath(out, "count(//" .. el("g") .. "[@class='edge'])"))
    assert.equal("db->api", xpath(out, "string(//" .. el("g") .. "[@class='edge'][1]/" .. el("title") .. ")"):gsub("&gt;", ">"))
  end)

  it("without dot says what to install and exits 1; --dot with --svg is a usage error", function()
    local res = graph({ "--svg" }, { PATH = dir .. "/empty-path" })
    assert.equal(1, res.exit_code)
    assert.equal("", res.stdout)
    assert.equal("rrengine: --svg needs Graphviz's dot, which is not installed (apt-get install graphviz)\n", res.stderr)
    res = graph({ "--svg", "--dot" })
    assert.equal(2, res.exit_code)
    assert.equal("rrengine: --dot and --svg: choose one\n", res.stderr)
  end)
end)
