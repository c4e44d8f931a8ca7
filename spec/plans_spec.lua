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
  local res, _, r = proc.run(argv, { timeout = 30 })
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
    assert.equal("rrengine: --service NAME is required\n", res.stderr)
    res = plan("rollback", { "--services", good, "--service", "zz" })
    assert.equal(2, res.exit_code)
    assert.equal(('rrengine: unknown service "zz" in %s\n'):format(good), res.stderr)
  end)
end)
