-- The start the plans graph.lua, status.lua and rollback.lua share (rr.cli.plan_start), as an
-- operator sees it: the real binary, its stdout, stderr and exit code. Nothing here reaches a
-- service manager: every case ends before the plan connects.
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

-- Runs `rrengine plans/<plan>.lua args...`; returns the result (exit_code, stdout, stderr).
local function plan(name, args)
  local argv = { helpers.engine, "plans/" .. name .. ".lua" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local res, _, _, r = proc.run(argv, { timeout = 30 })
  return res or r
end

describe("plans graph, status and rollback", function()
  local dir, good, bad, broken
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-plans-"))
    good = helpers.write(dir .. "/good.lua", [[
      return { services = {
        { name = "db", unit = "db.service" },
        { name = "api", unit = "api.service", depends = { "db" } },
      } }]])
    bad = helpers.write(dir .. "/bad.lua", [[
      return { services = {
        { name = "x", unit = "x.service", helth = "systemd" },
        { name = "y", unit = "not a unit" },
      } }]])
    broken = helpers.write(dir .. "/broken.lua", "return { services = { ")
  end)
  teardown(function() fs.remove_tree(dir) end)

  for _, name in ipairs({ "graph", "status", "rollback" }) do
    describe(name .. ".lua", function()
      it("prints its usage and exits 0 on --help, before anything else is checked", function()
        for _, args in ipairs({ { "--help" }, { "-h" }, { "--services", bad, "--help" } }) do
          local res = plan(name, args)
          assert.equal(0, res.exit_code, res.stderr)
          assert.matches("^Usage: rrengine plans/" .. name .. "%.lua", res.stdout)
          assert.equal("", res.stderr)
        end
      end)

      it("refuses a services file with problems: exit 2, one line per problem", function()
        local args = { "--services", bad }
        if name == "rollback" then args[#args + 1] = "--service"; args[#args + 1] = "x" end
        local res = plan(name, args)
        assert.equal(2, res.exit_code)
        assert.equal("", res.stdout)
        local lines = {}
        for line in res.stderr:gmatch("[^\n]+") do lines[#lines + 1] = line end
        assert.is_true(#lines >= 2, res.stderr)
        for _, line in ipairs(lines) do assert.matches("^rrengine: ", line) end
        assert.matches('service "x": field "helth" is unknown %(did you mean "health"%?%)', res.stderr)
        assert.matches('service "y"', res.stderr)
      end)

      it("refuses a services file that is not valid Lua, and one that is missing: exit 2", function()
        for _, file in ipairs({ broken, dir .. "/missing.lua" }) do
          local args = { "--services", file }
          if name == "rollback" then args[#args + 1] = "--service"; args[#args + 1] = "x" end
          local res = plan(name, args)
          assert.equal(2, res.exit_code)
          assert.matches("^rrengine: [^\n]*" .. file:match("[^/]+$"):gsub("%p", "%%%0"), res.stderr)
        end
      end)
    end)
  end

  it("graph.lua and status.lua: a bad option is one line, exit 2", function()
    for _, name in ipairs({ "graph", "status" }) do
      local res = plan(name, { "--frob", "--help" })
      assert.equal(2, res.exit_code)
      assert.equal("rrengine: unknown option --frob\n", res.stderr)
      res = plan(name, { "--servics", good })
      assert.equal("rrengine: unknown option --servics (did you mean --services?)\n", res.stderr)
    end
  end)

  it("every plan: an empty value or a forgotten one is one line naming the option, exit 2", function()
    for _, case in ipairs({
      { "rolling", { "--events", "" }, "option --events needs a value (FILE), got an empty string (try --help)" },
      { "rolling", { "--services=" }, "option --services needs a value (FILE), got an empty string (try --help)" },
      { "rolling", { "--deploy-path", "", "--deploy", "--service", "db" },
        "option --deploy-path needs a value (DIR), got an empty string (try --help)" },
      { "rolling", { "--hooks", "--dry-run" }, "option --hooks needs a value (FILE) (try --help)" },
      { "rolling", { "--service", "-h" }, "option --service needs a value (NAME) (try --help)" },
      { "rollback", { "--service", "" }, "option --service needs a value (NAME), got an empty string (try --help)" },
      { "rollback", { "--service", "db", "--events", "--force" }, "option --events needs a value (FILE) (try --help)" },
      { "graph", { "--services", "" }, "option --services needs a value (FILE), got an empty string" },
      { "status", { "--services", "--json" }, "option --services needs a value (FILE)" },
    }) do
      local res = plan(case[1], case[2])
      assert.equal(2, res.exit_code, res.stderr)
      assert.equal("rrengine: " .. case[3] .. "\n", res.stderr)
      assert.equal("", res.stdout)
    end
  end)

  it("graph.lua prints the order and the waves", function()
    local res = plan("graph", { "--services", good })
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(" 1. db                           db.service\n"
      .. " 2. api                          api.service  after db\n\nwave 1: db\nwave 2: api\n", res.stdout)
  end)

  it("rollback.lua: a bad option says to try --help; --service is checked before the file", function()
    local res = plan("rollback", { "--frob" })
    assert.equal(2, res.exit_code)
    assert.equal("rrengine: unknown option --frob (try --help)\n", res.stderr)
    res = plan("rollback", { "--services", bad })
    assert.equal(2, res.exit_code)
    assert.equal("rrengine: --service NAME or --group NAME is required\n", res.stderr)
    res = plan("rollback", { "--services", good, "--service", "zz" })
    assert.equal(2, res.exit_code)
    assert.equal(('rrengine: unknown service "zz" in %s\n'):format(good), res.stderr)
    res = plan("rollback", { "--services", bad, "--service", "api", "--group", "g" })
    assert.equal(2, res.exit_code)
    assert.equal("rrengine: --service and --group contradict each other (one service, or a group's held canaries)\n",
      res.stderr)
    res = plan("rollback", { "--services", bad, "--group", "g", "--no-code" })
    assert.equal(2, res.exit_code)
    assert.equal("rrengine: --no-code goes with --service, not --group\n", res.stderr)
    res = plan("rollback", { "--services", good, "--group", "zz" })
    assert.equal(2, res.exit_code)
    assert.equal(('rrengine: unknown group "zz" in %s\n'):format(good), res.stderr)
  end)
end)

-- Without --services, every plan and the REPL take ./services.lua, else the host's file:
-- /etc/rrengine/services.lua, or with --user $XDG_CONFIG_HOME/rrengine/services.lua (~/.config).
describe("the services file when --services is not given", function()
  local dir, empty, config
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-fhs-"))
    empty = dir .. "/cwd"
    assert(fs.mkdir_p(empty, 493))
    config = dir .. "/config"
    helpers.write(config .. "/rrengine/services.lua", [[
      return { services = { { name = "from-config", unit = "from-config.service" } } }]])
    helpers.write(dir .. "/home/.config/rrengine/services.lua", [[
      return { services = { { name = "from-home", unit = "from-home.service" } } }]])
    helpers.write(dir .. "/here/services.lua", [[
      return { services = { { name = "from-here", unit = "from-here.service" } } }]])
  end)
  teardown(function() fs.remove_tree(dir) end)

  -- `rrengine ARGS...` in cwd with these environment variables (false: unset).
  local function engine(args, cwd, env, stdin)
    local argv = { helpers.engine }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local res, _, _, r = proc.run(argv, { cwd = cwd, env = env, stdin = stdin, timeout = 30 })
    return res or r
  end

  local PLANS = { { "plans/graph.lua" }, { "plans/status.lua" }, { "plans/rollback.lua", "--service", "x" },
    { "plans/rolling.lua", "--dry-run" }, { "plans/rolling.lua" } }

  it("none there: exit 2, naming every place looked at (every plan)", function()
    -- the system's place is this machine's /etc: the check needs it absent
    assert.is_nil(fs.stat("/etc/rrengine/services.lua"))
    for _, args in ipairs(PLANS) do
      local res = engine(args, empty, { XDG_CONFIG_HOME = dir .. "/nothing" })
      assert.equal(2, res.exit_code, args[1])
      assert.equal("rrengine: no services file: looked for ./services.lua and /etc/rrengine/services.lua "
        .. "(give one with --services FILE)\n", res.stderr, args[1])
      assert.equal("", res.stdout, args[1])
      if args[1] ~= "plans/graph.lua" then
        local u = { table.unpack(args) }
        u[#u + 1] = "--user"
        res = engine(u, empty, { XDG_CONFIG_HOME = dir .. "/nothing" })
        assert.equal(2, res.exit_code, args[1])
        assert.equal(("rrengine: no services file: looked for ./services.lua and %s/nothing/rrengine/services.lua "
          .. "(give one with --services FILE)\n"):format(dir), res.stderr, args[1])
      end
    end
    -- --help needs no services file
    for _, args in ipairs(PLANS) do
      local res = engine({ args[1], "--help" }, empty, { XDG_CONFIG_HOME = dir .. "/nothing" })
      assert.equal(0, res.exit_code, args[1])
      assert.matches("/etc/rrengine/services%.lua", res.stdout, args[1])
    end
  end)

  it("--user: $XDG_CONFIG_HOME/rrengine/services.lua, else ~/.config/rrengine/services.lua; ./services.lua first", function()
    local res = engine({ "plans/graph.lua", "--user" }, empty, { XDG_CONFIG_HOME = config })
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^ 1%. from%-config ", res.stdout)
    res = engine({ "plans/graph.lua", "--user" }, empty, { XDG_CONFIG_HOME = false, HOME = dir .. "/home" })
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^ 1%. from%-home ", res.stdout)
    res = engine({ "plans/graph.lua", "--user" }, dir .. "/here", { XDG_CONFIG_HOME = config })
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^ 1%. from%-here ", res.stdout)
    -- --services still wins
    res = engine({ "plans/graph.lua", "--user", "--services", dir .. "/here/services.lua" }, empty,
      { XDG_CONFIG_HOME = config })
    assert.matches("^ 1%. from%-here ", res.stdout)
  end)

  it("the REPL looks in the same places and says where it looked", function()
    local env = { XDG_CONFIG_HOME = config, RRENGINE_SERVICES = false, RRENGINE_USER = false, HOME = dir }
    local res = engine({ "-i", "--user" }, empty, env, "print(#services_file and 1)\n")
    assert.equal(0, res.exit_code, res.stderr)
    assert.matches("^rrengine REPL: 1 services from " .. (config .. "/rrengine/services.lua"):gsub("%p", "%%%0")
      .. " %(user manager%)", res.stdout)
    env.XDG_CONFIG_HOME = dir .. "/nothing"
    res = engine({ "-i", "--user" }, empty, env, 'status()\n')
    assert.equal(0, res.exit_code, res.stderr)
    local where = ("no services file: looked for ./services.lua and %s/nothing/rrengine/services.lua "
      .. "(give one with --services FILE)"):format(dir)
    assert.matches("^rrengine REPL: " .. where:gsub("%p", "%%%0") .. "; services_file%(path%) loads one", res.stdout)
    assert.equal("rrengine: " .. where .. "\n", res.stderr)
  end)
end)
