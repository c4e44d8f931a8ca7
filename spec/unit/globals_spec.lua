-- No Lua file of the engine reads or writes a global it did not mean to: a module-level local
-- renamed in one branch and still used under its old name in another (a merge) becomes a nil
-- global that only fails when that line runs. luac's listing names every global access.
local proc = require("rr.proc")
local fs = require("rr.fs")

-- Lua's own globals, and what the engine's files may use besides.
local ALLOWED = {}
for name in pairs(_G) do ALLOWED[name] = true end
for _, name in ipairs({ "arg" }) do ALLOWED[name] = true end

local function lua_files()
  local out = {}
  for _, dir in ipairs({ "lua/rr", "plans", "hooks" }) do
    for _, name in ipairs(assert(fs.list(dir))) do
      if name:match("%.lua$") then out[#out + 1] = dir .. "/" .. name end
    end
  end
  table.sort(out)
  return out
end

describe("the engine's Lua files", function()
  it("use no global but Lua's own", function()
    local files = lua_files()
    assert.is_true(#files > 20)
    local found = {}
    for _, file in ipairs(files) do
      local res = assert(proc.run({ "luac5.4", "-l", "-p", file }, { capture = true }))
      for line in res.stdout:gmatch("[^\n]+") do
        local name = line:match("[GS]ETTABUP.-_ENV \"([%w_]+)\"")
        if name and not ALLOWED[name] then found[#found + 1] = file .. ": " .. name end
      end
    end
    assert.same({}, found)
  end)

  it("catches one that does (the check can fail)", function()
    local dir = assert(fs.mkdtemp("/tmp/rr-globals-spec."))
    local file = dir .. "/bad.lua"
    assert(fs.write_atomic(file, "local rrfs = require('rr.fs')\nreturn function() return fs.read('x') end\n"))
    local res = assert(proc.run({ "luac5.4", "-l", "-p", file }, { capture = true }))
    fs.remove_tree(dir)
    assert.matches('GETTABUP.-_ENV "fs"', res.stdout)
  end)
end)
