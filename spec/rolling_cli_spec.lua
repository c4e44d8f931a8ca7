-- plans/rolling.lua as an operator runs it: exit codes, messages, the lock, interruption,
-- hooks, stabilization failures, --json. Real binary, real sandboxed manager.
local rr = require("rr")
local fs = require("rr.fs")
local helpers = require("spec.support.helpers")
local units = require("spec.support.units")
local platform = require("spec.support.platform")

describe("plans/rolling.lua", function()
  local p
  setup(function()
    p = platform.new({
      { name = "a", http = true, stabilize = 1 },
      { name = "b", depends = { "a" }, http = true, stabilize = 1 },
      { name = "c", depends = { "b" }, http = true, stabilize = 1 },
    })
    p:start()
  end)
  teardown(function() p:teardown() end)

  describe("refuses bad input with exit 2, a one-line message, and touches nothing", function()
    local pids
    before_each(function()
      pids = {}
      for _, n in ipairs({ "a", "b", "c" }) do pids[n] = p:props(n).MainPID end
      os.remove(p.events_file)
    end)
    after_each(function()
      for _, n in ipairs({ "a", "b", "c" }) do assert.equal(pids[n], p:props(n).MainPID, n .. " was touched") end
      assert.is_nil(fs.stat(p.events_file), "an event log was written")
    end)

    local cases = {
      { "an unknown option", { "--frobnicate" }, "unknown option %-%-frobnicate" },
      { "a missing value", { "--service" }, "needs a value" },
      { "--deploy without --deploy-path", { "--deploy", "--service", "a" }, "%-%-deploy%-path" },
      { "a deploy path that does not exist", { "--deploy", "--deploy-path", "/nonexistent/release", "--service", "a" },
        "/nonexistent/release" },
      { "an unknown service", { "--service", "nosuch" }, 'unknown service "nosuch"' },
      { "a bad --parallel", { "--parallel", "zero" }, "%-%-parallel" },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        local res = p:cli(case[2])
        assert.equal(2, res.exit_code, res.stderr)
        assert.matches(case[3], res.stderr)
        assert.matches("^rrengine: [^\n]+\n$", res.stderr)
        assert.not_matches("traceback", res.stderr)
      end)
    end

    it("a services file with problems: every problem, each naming service and field", function()
      local bad = helpers.write(p.dir .. "/bad-services.lua", [[
        return { services = {
          { name = "x", unit = "x.service", helth = "systemd" },
          { name = "y", unit = "not a unit", depends = { "nope" } },
        } }]])
      local res = p:cli({}, { services_file = bad })
      assert.equal(2, res.exit_code)
      assert.matches('service "x": field "helth" is unknown', res.stderr)
      assert.matches('service "y"', res.stderr)
      assert.matches("nope", res.stderr)
      assert.not_matches("traceback", res.stderr)
    end)

    it("a services file that is not valid Lua", function()
      local bad = helpers.write(p.dir .. "/broken-services.lua", "return { services = { ")
      local res = p:cli({}, { services_file = bad })
      assert.equal(2, res.exit_code)
      assert.matches("broken%-services%.lua:1:", res.stderr)
    end)
  end)

  it("--help shows examples first, then options and exit codes", function()
    local res = p:cli({ "--help" })
    assert.equal(0, res.exit_code)
    local ex, opt, codes = res.stdout:find("Examples"), res.stdout:find("%-%-dry%-run"), res.stdout:find("130")
    assert.is_truthy(ex and opt and codes)
    assert.is_true(ex < opt)
  end)

  it("refuses a second run at once, naming the holder's PID", function()
    assert(fs.mkdir_p(p.state_root, 448))
    local lock = assert(fs.lock(p.state_root .. "/run.lock"))
    local pid = p:props("a").MainPID
    local t0 = rr.now()
    local res = p:cli({ "--service", "a" })
    lock:unlock()
    assert.equal(1, res.exit_code)
    assert.matches("locked by pid " .. fs.getpid(), res.stderr)
    assert.is_true(rr.now() - t0 < 10)
    assert.equal(pid, p:props("a").MainPID)
  end)

  it("prints one JSON summary with --json", function()
    local res = p:cli({ "--service", "a", "--json" })
    assert.equal(0, res.exit_code, res.stderr)
    local summary = require("cjson").decode(res.stdout)
    assert.is_true(summary.success)
    assert.same({ "a" }, summary.services_succeeded)
    assert.equal(0, #summary.services_failed)
    assert.matches('"services_failed":%[%]', res.stdout) -- a list, also when empty
    assert.equal(1, #summary.services)
    assert.equal("succeeded", summary.services[1].outcome)
    assert.is_number(summary.duration_ms)
  end)

  it("--json: every service's outcome, method, duration and error", function()
    -- b turns unhealthy once its new version is stabilizing, and healthy again when the rollback
    -- starts (the old version is fine): b is rolled back, c (after b) is skipped
    local ctl = p.by_name.b.control
    local hook = helpers.write(p.dir .. "/break-b.lua", ([[
      local units = dofile(%q)
      return { on_event = function(ev)
        if ev.service ~= "b" then return end
        if ev.event == "STABILIZE_START" then units.control(%q, { status = 500 }) end
        if ev.event == "ROLLBACK_START" then units.control(%q, nil) end
      end }]]):format(units.root .. "/spec/support/units.lua", ctl, ctl))
    local res = p:cli({ "--json", "--hooks", hook })
    assert.equal(1, res.exit_code, res.stderr)
    local cjson = require("cjson")
    local summary = cjson.decode(res.stdout)
    -- the lists of names stay as they were
    assert.same({ "a" }, summary.services_succeeded)
    assert.same({ "b" }, summary.services_failed)
    assert.same({ "b" }, summary.services_rolled_back)
    assert.same({ "c" }, summary.services_skipped)
    assert.matches('"services_rollback_failed":%[%]', res.stdout)
    -- and one entry per service, in the plan's order, every key present (null when unknown)
    assert.equal(3, #summary.services)
    local a, b, c = summary.services[1], summary.services[2], summary.services[3]
    assert.same({ "a", "succeeded", "restart", cjson.null },
      { a.name, a.outcome, a.method, a.error })
    assert.is_true(a.duration_ms >= 1000, "a stabilizes for 1 s") -- the flow's own time
    assert.same({ "b", "rolled_back", "restart" }, { b.name, b.outcome, b.method })
    assert.matches("^unstable after restart: ", b.error)
    assert.is_number(b.duration_ms)
    assert.same({ "c", "skipped", cjson.null, cjson.null }, { c.name, c.outcome, c.method, c.duration_ms })
    assert.equal("depends on b, which failed", c.error)
    assert.matches('"method":null', res.stdout)
    -- the durations are the events' own
    assert.equal(p:last_event("SERVICE_RESTART_SUCCESS", "a").duration_ms, a.duration_ms)
    assert.equal(p:last_event("SERVICE_RESTART_FAILED", "b").duration_ms, b.duration_ms)
  end)

  it("--json: a service whose pre-check failed is failed, untouched, with no method", function()
    p:control("a", { status = 500 })
    local res = p:cli({ "--json", "--service", "a" })
    p:control("a", nil)
    assert.equal(1, res.exit_code, res.stderr)
    local summary = require("cjson").decode(res.stdout)
    assert.equal(1, #summary.services)
    local a = summary.services[1]
    assert.same({ "a", "failed", require("cjson").null }, { a.name, a.outcome, a.method })
    assert.matches("HTTP 500", a.error)
    assert.is_number(a.duration_ms)
    assert.matches('"services_rolled_back":%[%]', res.stdout)
  end)

  it("on SIGINT finishes the service in flight, starts no other, exits 130", function()
    local sent = false
    local res = p:cli({}, {
      spawned = function(h) p.handle = h end,
      on_line = function(_, line)
        -- plain (non-terminal) output: one timestamped line per step
        if not sent and line:match("^%S+%s+b%s+pre%-check") then
          sent = true
          p.handle:kill("INT")
        end
      end,
    })
    assert.is_true(sent, "never saw b's pre-check")
    assert.equal(130, res.exit_code, res.stdout .. res.stderr)
    assert.is_truthy(p:last_event("SERVICE_RESTART_SUCCESS", "b"), "b did not finish its flow")
    local skipped = p:last_event("SERVICE_SKIPPED", "c")
    assert.matches("interrupted", skipped.reason)
    local plan_end = p:last_event("PLAN_END")
    assert.equal("interrupted", plan_end.result)
    assert.equal(130, plan_end.exit_code)
  end)

  it("killed with SIGKILL mid-run loses nothing: no stale lock, definitions intact, the next run works", function()
    local unit_files = {}
    for _, n in ipairs({ "a", "b", "c" }) do unit_files[n] = require("rr.fs").read(p.by_name[n].unit_path) end
    local killed = false
    local res = p:cli({}, {
      spawned = function(h) p.handle = h end,
      on_line = function(_, line)
        if not killed and line:match("^%S+%s+b%s+stabilize") then
          killed = true
          p.handle:kill("KILL")
        end
      end,
    })
    assert.is_true(killed, "never saw b's stabilization")
    assert.equal("SIGKILL", res.signal)
    for _, n in ipairs({ "a", "b", "c" }) do
      assert.equal(unit_files[n], require("rr.fs").read(p.by_name[n].unit_path), n .. "'s unit file changed")
      assert.equal("active", p:props(n).ActiveState)
    end
    -- every line of the event log is whole, even the last one written before the kill
    local text = require("rr.fs").read(p.events_file)
    assert.equal("\n", text:sub(-1))
    -- the next plain run refuses (the kill left b in flight) until --recover resolved it
    local refused = p:cli({})
    assert.equal(4, refused.exit_code, refused.stdout .. refused.stderr)
    assert.matches("b: left in phase", refused.stderr)
    local rec = p:cli({ "--recover" })
    assert.equal(0, rec.exit_code, rec.stdout .. rec.stderr)
    local again = p:cli({})
    assert.equal(0, again.exit_code, again.stdout .. again.stderr)
  end)
end)

describe("hooks", function()
  local p
  setup(function()
    p = platform.new({ { name = "a", http = true }, { name = "b", http = true } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("before_restart can veto a service: it is not touched", function()
    local hook = helpers.write(p.dir .. "/veto.lua", [[
      return { before_restart = function(svc)
        if svc.name == "a" then return false, "change freeze" end
        return true
      end }]])
    local pid = p:props("a").MainPID
    local summary = p:run({ hook_files = { hook }, continue_on_error = true })
    assert.equal(1, summary.exit_code)
    assert.same({ "a" }, summary.services_failed)
    assert.same({ "b" }, summary.services_succeeded)
    assert.equal(pid, p:props("a").MainPID)
    assert.matches("change freeze", p:last_event("SERVICE_SKIPPED", "a").reason)
  end)

  it("a hook that raises fails its service with the error, never the engine", function()
    local hook = helpers.write(p.dir .. "/raise.lua", [[
      return { before_restart = function(svc) error("hook exploded for " .. svc.name) end }]])
    local pid = p:props("a").MainPID
    local summary = p:run({ hook_files = { hook }, services = { "a" } })
    assert.equal(1, summary.exit_code)
    assert.equal(pid, p:props("a").MainPID)
    assert.matches("hook exploded for a", p:last_event("SERVICE_RESTART_FAILED", "a").error)
  end)

  it("on_event sees every event, and can use the primitives (a task)", function()
    local seen = p.dir .. "/seen.txt"
    local hook = helpers.write(p.dir .. "/observe.lua", ([[
      local rr = require("rr")
      return { on_event = function(ev)
        rr.sleep(0.001)
        local f = io.open(%q, "a"); f:write(ev.event, "\n"); f:close()
      end }]]):format(seen))
    assert.is_true(p:run({ hook_files = { hook }, services = { "b" } }).success)
    local names = {}
    for line in fs.read(seen):gmatch("[^\n]+") do names[#names + 1] = line end
    assert.equal("PLAN_START", names[1])
    assert.equal("PLAN_END", names[#names])
    assert.is_truthy(fs.read(seen):find("SERVICE_RESTART_SUCCESS", 1, true))
  end)

  it("refuses a hook file that does not load, with exit 2 and nothing touched", function()
    local hook = helpers.write(p.dir .. "/broken-hook.lua", "return { before_restart = ")
    local summary = p:run({ hook_files = { hook } })
    assert.equal(2, summary.exit_code)
    assert.matches("broken%-hook%.lua", summary.error)
  end)
end)

describe("stabilization", function()
  local p
  before_each(function()
    p = platform.new({
      { name = "crashy", http = true, stabilize = 3 },
      { name = "flappy", http = true, stabilize = 3, extra_service = { "Restart=always", "RestartSec=100ms" } },
    })
    p:start()
    assert.is_true(p:run().success) -- known good
  end)
  after_each(function() p:teardown() end)

  local function break_after_start(name)
    local path = p.by_name[name].unit_path
    local text = fs.read(path)
    local good = text
    text = text:gsub("(ExecStart=[^\n]+)", "%1 --exit-after 0.5", 1)
    assert(fs.write_atomic(path, text))
    return good
  end

  it("rolls back at once when the unit exits during stabilization", function()
    local good = break_after_start("crashy")
    local t0 = rr.now()
    local summary = p:run({ services = { "crashy" } })
    assert.equal(1, summary.exit_code)
    assert.same({ "crashy" }, summary.services_rolled_back)
    assert.is_true(rr.now() - t0 < 10)
    assert.matches("left active", p:last_event("STABILIZE_FAILED", "crashy").error)
    assert.equal(good, fs.read(p.by_name.crashy.unit_path))
    assert.equal("active", p:props("crashy").ActiveState)
  end)

  it("rolls back when systemd restarts the unit during stabilization (flapping)", function()
    local good = break_after_start("flappy")
    local summary = p:run({ services = { "flappy" } })
    assert.equal(1, summary.exit_code)
    assert.same({ "flappy" }, summary.services_rolled_back)
    local err = p:last_event("STABILIZE_FAILED", "flappy").error
    assert.is_truthy(err:match("NRestarts") or err:match("MainPID") or err:match("left active"), err)
    assert.equal(good, fs.read(p.by_name.flappy.unit_path))
  end)

  it("rolls back when the health endpoint fails during stabilization", function()
    -- A run-wide hook turns the service unhealthy once stabilization starts, and the old
    -- version healthy again when the rollback starts: driven by the events themselves.
    local hook = helpers.write(p.dir .. "/breaker.lua", ([[
      local units = dofile(%q)
      return { on_event = function(ev)
        if ev.event == "STABILIZE_START" then units.control(%q, { status = 500 }) end
        if ev.event == "ROLLBACK_START" then units.control(%q, nil) end
      end }]]):format(units.root .. "/spec/support/units.lua", p.by_name.crashy.control, p.by_name.crashy.control))
    local summary = p:run({ services = { "crashy" }, hook_files = { hook } })
    assert.equal(1, summary.exit_code)
    assert.matches("probe failed during stabilization", p:last_event("STABILIZE_FAILED", "crashy").error)
  end)
end)

describe("on a terminal", function()
  local p
  setup(function()
    p = platform.new({ { name = "a", http = true, stabilize = 1 } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("shows a live line with the service in flight, its step and the elapsed time", function()
    -- script(1) gives the engine a real pseudo-terminal
    local cmd = ("XDG_STATE_HOME=%s %s plans/rolling.lua --user --services %s --events %s")
      :format(p.xdg_state, helpers.engine, p.services_file, p.events_file)
    local res, err, _, r = require("rr.proc").run({ "script", "-qec", cmd, "/dev/null" }, { timeout = 60 })
    res = res or r
    assert.is_truthy(res, err)
    assert.equal(0, res.exit_code, res.stdout)
    assert.matches("▸ a: stabilize %d+%.%ds", res.stdout)
    assert.matches("\r", res.stdout, 1, true)
    assert.matches("✔ a%s+restart ok", res.stdout)
    assert.not_matches("%d%d:%d%d:%d%d%.%d%d%d  a", res.stdout) -- no plain timestamped lines
  end)
end)

describe("on a terminal, a long run", function()
  local p
  setup(function()
    p = platform.new({
      { name = "postgresql-primary", http = true, stabilize = 1 },
      { name = "redis-cache-primary", http = true, stabilize = 1 },
      { name = "object-storage-minio", http = true, stabilize = 1 },
      { name = "search-engine-index", http = true, stabilize = 1 },
    })
    p:start()
  end)
  teardown(function() p:teardown() end)

  -- The run through script(1), a real pseudo-terminal of `cols` columns; returns what the
  -- terminal received.
  local function run_at(cols)
    local cmd = ("stty cols %d rows 24; XDG_STATE_HOME=%s %s plans/rolling.lua --user --parallel 4 --services %s --events %s")
      :format(cols, p.xdg_state, helpers.engine, p.services_file, p.events_file)
    local res, err, _, r = require("rr.proc").run({ "script", "-qec", cmd, "/dev/null" }, { timeout = 60 })
    res = res or r
    assert.is_truthy(res, err)
    assert.equal(0, res.exit_code, res.stdout)
    return res.stdout
  end

  -- Every stretch of text the terminal drew between two carriage returns or newlines, escape
  -- sequences removed.
  local function drawn(out)
    local pieces = {}
    for piece in (out:gsub("\27%[[%d;]*[A-Za-z]", "")):gmatch("[^\r\n]+") do pieces[#pieces + 1] = piece end
    return pieces
  end

  it("at 70 columns: progress, elapsed time, and no line wider than the terminal", function()
    local out = run_at(70)
    assert.matches("%[%d/4%] %d+s", out)
    local live = 0
    for _, piece in ipairs(drawn(out)) do
      if piece:match("^%[%d/4%]") then -- the live line (lines printed once may wrap: they are never redrawn)
        live = live + 1
        assert.is_true((utf8.len(piece) or #piece) < 70, ("a live line wider than the terminal: %q"):format(piece))
      end
    end
    assert.is_true(live > 0, "no live line drawn")
    assert.matches("…", out, 1, true) -- four services in flight do not fit: the live line is cut
    assert.matches("✔ search%-engine%-index%s+restart ok %([^)]+%)  %[%d/4%]", out)
  end)

  it("follows a resize: after the terminal shrinks, no live line is wider than the new width", function()
    -- the terminal is resized (stty on the pty) while the run goes on, one service at a time
    local cmd = ("stty cols 200 rows 24; (sleep 2; stty cols 50 </dev/tty) & "
      .. "XDG_STATE_HOME=%s %s plans/rolling.lua --user --parallel 1 --services %s --events %s")
      :format(p.xdg_state, helpers.engine, p.services_file, p.events_file)
    local res, err, _, r = require("rr.proc").run({ "script", "-qec", cmd, "/dev/null" }, { timeout = 60 })
    res = res or r
    assert.is_truthy(res, err)
    assert.equal(0, res.exit_code, res.stdout)
    local wide, narrow_seen = 0, false
    for _, piece in ipairs(drawn(res.stdout)) do
      -- live lines with a service in flight: about 60 columns before the resize, cut after it
      if piece:match("^%[%d/4%]") and piece:find("▸", 1, true) then
        local n = utf8.len(piece) or #piece
        if n < 50 then narrow_seen = true end
        if narrow_seen and n >= 50 then wide = wide + 1 end
      end
    end
    assert.is_true(narrow_seen, "no live line fitted the resized terminal")
    assert.equal(0, wide, "live lines wider than the terminal after it shrank")
  end)

  it("at 200 columns: every service in flight on the live line, and an ETA from the earlier run", function()
    local out = run_at(200)
    assert.matches("left", out)  -- the previous run's durations give an ETA
    local whole
    for _, piece in ipairs(drawn(out)) do
      if piece:find("postgresql-primary:", 1, true) and piece:find("search-engine-index:", 1, true) then whole = piece end
    end
    assert.is_truthy(whole, "no live line showed all four services")
  end)
end)
