-- rr.chunk: Lua files run within an instruction limit and a wall-clock limit, and the failure
-- forms of loading one. A file that could hang the engine loads in a child engine with a
-- timeout, so that a regression fails instead of hanging the run.
local chunk = require("rr.chunk")
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

local dir
setup(function() dir = assert(fs.mkdtemp("/tmp/rr-chunk-")) end)
teardown(function() fs.remove_tree(dir) end)

local function file(name, text)
  return helpers.write(dir .. "/" .. name, text)
end

describe("rr.chunk.run", function()
  it("returns true and every result", function()
    assert.same({ true, 1, nil, 3 }, { chunk.run(function() return 1, nil, 3 end) })
  end)

  it("returns a raised error without its traceback, then ERAISED and the traceback", function()
    local ok, err, code, trace = chunk.run(function() error("no good", 0) end)
    assert.is_nil(ok)
    assert.equal("no good", err)
    assert.equal("ERAISED", code)
    assert.matches("^no good\nstack traceback:\n", trace)
    local value = {}
    assert.same({ nil, value, "ERAISED" }, { chunk.run(function() error(value) end) })
  end)

  it("stops what outlives opts.seconds: ETIMEDOUT, naming opts.name", function()
    assert.same({ nil, "thing.lua did not finish loading within 0.2 s", "ETIMEDOUT" },
      { chunk.run(function() while true do end end, { seconds = 0.2, name = "thing.lua" }) })
    assert.same({ nil, "thing.lua did not finish loading within 0.2 s", "ETIMEDOUT" },
      { chunk.run(function() require("rr").sleep(3600) end, { seconds = 0.2, name = "thing.lua" }) })
  end)

  it("stops what runs more than opts.instructions: ELIMIT", function()
    local ok, err, code = chunk.run(function() while true do end end, { instructions = 5000 })
    assert.is_nil(ok)
    assert.matches("^.*chunk_spec%.lua:%d+: runs more than 5000 instructions %(an endless loop%?%)$", err)
    assert.equal("ELIMIT", code)
  end)

  it("raises for a function it cannot run", function()
    assert.has_error(function() chunk.run("return 1") end, "rr.chunk.run: fn must be a function, got string")
  end)
end)

describe("rr.chunk.load", function()
  it("runs a file in the environment given, as loadfile reads it", function()
    local path = file("env.lua", "\239\187\191#!/usr/bin/env rrengine\nseen = who\nreturn debug.getinfo(1, 'l').currentline\n")
    local env = { who = "me", debug = debug }
    assert.same({ true, 3 }, { chunk.load(path, { env = env }) })
    assert.equal("me", env.seen)
    assert.is_nil(rawget(_G, "seen"))
  end)

  it("fails with the errno code for a file it cannot read", function()
    local path = dir .. "/missing.lua"
    assert.same({ nil, "cannot read " .. path .. ": No such file or directory", "ENOENT" }, { chunk.load(path) })
  end)

  it("refuses what is not a regular file (a FIFO would block the engine)", function()
    local fifo = dir .. "/fifo.lua"
    helpers.run({ "mkfifo", fifo })
    assert.same({ nil, "cannot read " .. fifo .. ": not a regular file (a FIFO, a socket or a device)", "EINVAL" },
      { chunk.load(fifo) })
    assert.same({ nil, "cannot read " .. dir .. ": not a regular file (a directory)", "EINVAL" }, { chunk.load(dir) })
  end)

  it("returns a syntax error with ESYNTAX", function()
    local path = file("syntax.lua", "local x = 1\nreturn x +\n")
    local ok, err, code = chunk.load(path)
    assert.is_nil(ok)
    assert.equal("ESYNTAX", code)
    assert.equal(path .. ":3: unexpected symbol near <eof>", err)
  end)

  it("passes the limits on: a file that loops forever fails with the file's name", function()
    local path = file("loop.lua", "while true do end\n")
    assert.same({ nil, path .. " did not finish loading within 0.2 s", "ETIMEDOUT" }, { chunk.load(path, { seconds = 0.2 }) })
    assert.same({ nil, path .. ":1: runs more than 5000 instructions (an endless loop?)", "ELIMIT" },
      { chunk.load(path, { instructions = 5000 }) })
  end)
end)

describe("rr.services.load", function()
  it("stops a file that spends its time in C calls at services.LOAD_TIMEOUT", function()
    -- few instructions, each a slow string.find: the instruction limit alone takes hours
    local path = file("slow-services.lua", "for _ = 1, 1e9 do ('a'):rep(2000):find('.-b') end\nreturn {}\n")
    local res, _, _, r = proc.run({ helpers.engine, "-e", ([[
      local services = require("rr.services")
      services.LOAD_TIMEOUT = 0.3
      local ok, problems = services.load(%q)
      print(ok, problems[1])
    ]]):format(path) }, { timeout = 30 })
    res = res or r
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal(("nil\t%s did not finish loading within 0.3 s\n"):format(path), res.stdout)
  end)
end)
