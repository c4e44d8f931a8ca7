-- The manual pages: generated from man/*.scd by `make man` (scdoc), formatted by groff with
-- every warning on and by man(1) without one, and kept in step with what the plans say about
-- themselves (every option of every plan's --help is in rrengine(1)).
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

local root = fs.realpath(".")

local function run(argv, opts)
  local res, err, _, r = proc.run(argv, opts)
  local out = res or r
  assert(type(out) == "table", err)
  return out
end

local PAGES = { "rrengine.1", "rrengine-services.5" }

describe("manual pages", function()
  local dir
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-man-"))
    local res = run({ "make", "--no-print-directory", "man" }, { cwd = root, timeout = 120 })
    assert(res.exit_code == 0, res.stdout .. res.stderr)
  end)
  teardown(function() fs.remove_tree(dir) end)

  -- groff's warnings for a page (all of them: -ww), formatted and discarded (-z).
  local function groff_warnings(path)
    local res = run({ "groff", "-ww", "-z", "-man", path })
    return res.exit_code, res.stderr
  end

  it("format without a single groff warning", function()
    for _, page in ipairs(PAGES) do
      local code, warnings = groff_warnings(root .. "/build/man/" .. page)
      assert.equal(0, code, page)
      assert.equal("", warnings, page)
    end
  end)

  it("the check itself sees a broken page (an unknown macro, a runaway font)", function()
    local bad = helpers.write(dir .. "/bad.1", '.TH BAD 1\n.SH NAME\nbad \\- broken\n.XX unknown\n\\fBbold\n')
    local _, warnings = groff_warnings(bad)
    assert.matches("macro 'XX' not defined", warnings)
  end)

  it("man -l renders each page with --warnings and nothing on stderr", function()
    for _, page in ipairs(PAGES) do
      local res = run({ "man", "--warnings", "-l", root .. "/build/man/" .. page },
        { env = { MANWIDTH = "80", LC_ALL = "C.UTF-8", MANPAGER = "cat", PAGER = "cat" } })
      assert.equal(0, res.exit_code, page .. ": " .. res.stderr)
      assert.equal("", res.stderr, page)
      assert.matches("NAME", res.stdout)
      assert.not_matches("@DATADIR@", res.stdout)
      assert.not_matches("@DOCDIR@", res.stdout)
    end
  end)

  it("rrengine(1) has the sections an operator looks for and every exit code", function()
    local text = run({ "man", "-l", root .. "/build/man/rrengine.1" },
      { env = { MANWIDTH = "200", LC_ALL = "C.UTF-8", MANPAGER = "cat" } }).stdout
    for _, section in ipairs({ "NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "PLANS", "EXIT STATUS", "ENVIRONMENT",
                               "FILES", "EXAMPLES", "SEE ALSO" }) do
      assert.matches("\n" .. section .. "\n", text, section)
    end
    local exit = text:match("\nEXIT STATUS\n(.-)\nENVIRONMENT\n")
    for _, code in ipairs({ "0", "1", "2", "3", "4", "130" }) do
      assert.matches("\n       " .. code .. "\n", exit, "exit code " .. code)
    end
    -- the plans' paths are this build's (DATADIR filled in)
    local datadir = assert(fs.read(root .. "/build/datadir.stamp")):match("^(%S+)")
    assert.matches(datadir:gsub("%p", "%%%0") .. "/plans/", text)
  end)

  it("rrengine(1) documents every option of every plan's --help and of the engine's", function()
    local page = assert(fs.read(root .. "/man/rrengine.1.scd"))
    local plans = {}
    for _, f in ipairs(assert(fs.list(root .. "/plans"))) do
      if f:match("%.lua$") then plans[#plans + 1] = f end
    end
    table.sort(plans)
    assert.is_true(#plans >= 5)
    local missing = {}
    for _, plan in ipairs(plans) do
      -- the plan's own section: from its heading to the next heading
      local section = page:match("\n## plans/" .. plan:gsub("%p", "%%%0") .. "[^\n]*\n(.-)\n#")
      if not section then
        missing[#missing + 1] = "plans/" .. plan .. " (no section)"
      else
        local help = run({ helpers.engine, "plans/" .. plan, "--help" }, { cwd = root }).stdout
        for name in help:gmatch("\n  %-?%a?,? ?%-%-([%w-]+)") do
          if name ~= "help" and not section:find("*--" .. name .. "*", 1, true) then
            missing[#missing + 1] = ("plans/%s --%s"):format(plan, name)
          end
        end
      end
    end
    local usage = run({ helpers.engine, "--help" }).stdout
    for option in usage:gmatch("\n  (%-%-?[%w-]+)") do
      if not page:find("*" .. option .. "*", 1, true) then missing[#missing + 1] = "rrengine " .. option end
    end
    assert.same({}, missing)
  end)

  it("rrengine-services(5) documents every field the loader accepts", function()
    local page = assert(fs.read(root .. "/man/rrengine-services.5.scd"))
    local source = assert(fs.read(root .. "/lua/rr/services.lua"))
    local fields = {}
    for list in source:gmatch("local SERVICE_FIELDS = (%b{})") do
      for name in list:gmatch('"([%w_]+)"') do fields[#fields + 1] = name end
    end
    for _, var in ipairs({ "HEALTH_FIELDS", "TOP_FIELDS", "GROUP_FIELDS", "BALANCER_FIELDS", "CANARY_FIELDS",
        "BLUE_GREEN_FIELDS", "COLOUR_FIELDS" }) do
      for list in source:gmatch("local " .. var .. " = (%b{})") do
        for name in list:gmatch('"([%w_]+)"') do fields[#fields + 1] = name end
      end
    end
    assert.is_true(#fields >= 20)
    local missing = {}
    for _, name in ipairs(fields) do
      if not page:find("*" .. name .. "*", 1, true) then missing[#missing + 1] = name end
    end
    assert.same({}, missing)
  end)
end)
