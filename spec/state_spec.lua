-- rr.state: the deploy pointers' life cycle (begin / commit / undone) and the one notion of
-- "the same directory" every reader of the pointers uses.
local fs = require("rr.fs")
local state = require("rr.state")

describe("rr.state", function()
  local root, sr
  before_each(function()
    root = assert(fs.mkdtemp("/tmp/rr-state-spec."))
    sr = root .. "/sr"
  end)
  after_each(function() fs.remove_tree(root) end)

  local function record(dir, st)
    assert(fs.mkdir_p(dir, 448))
    if st then assert(fs.write_atomic(dir .. "/deploy.json", ('{"state":"%s"}'):format(st))) end
    return dir
  end

  it("compares paths one way: trailing slashes, spaces and symlinks do not matter", function()
    local d = record(root .. "/runs/r1/svc")
    assert(fs.symlink(root .. "/runs", root .. "/link"))
    assert.is_true(state.same_path(d, d .. "/"))
    assert.is_true(state.same_path(" " .. d .. " ", d))
    assert.is_true(state.same_path(root .. "/link/r1/svc", d))
    assert.is_false(state.same_path(d, root .. "/runs/r2/svc"))
    assert.is_false(state.same_path(nil, d))
  end)

  it("begin names the record, commit makes it the last, undone forgets it", function()
    local r1 = record(root .. "/runs/r1/svc", "applied")
    assert.is_true(state.deploy_begin(sr, "svc", r1))
    assert.equal(r1, state.read_pointer(sr, "svc", "inflight"))
    assert.is_true(state.deploy_commit(sr, "svc", r1))
    assert.is_nil(state.read_pointer(sr, "svc", "inflight"))
    assert.equal(r1, state.read_pointer(sr, "svc", "last"))
    local r2 = record(root .. "/runs/r2/svc", "applied")
    assert.is_true(state.deploy_begin(sr, "svc", r2))
    assert.is_true(state.deploy_undone(sr, "svc", r2 .. "/"))
    assert.is_nil(state.read_pointer(sr, "svc", "inflight"))
    assert.equal(r1, state.read_pointer(sr, "svc", "last")) -- another record's pointer stays
  end)

  it("never overwrites the pointer of an unfinished deploy", function()
    local r1 = record(root .. "/runs/r1/svc", "applying")
    assert.is_true(state.deploy_begin(sr, "svc", r1))
    local r2 = record(root .. "/runs/r2/svc")
    local ok, err, code = state.deploy_begin(sr, "svc", r2)
    assert.is_nil(ok)
    assert.equal("EUNFINISHED", code)
    assert.matches("did not finish", err)
    assert.equal(r1, state.read_pointer(sr, "svc", "inflight"))
    -- once that deploy is undone, a new one may begin
    assert(fs.write_atomic(r1 .. "/deploy.json", '{"state":"undone"}'))
    assert.is_true(state.deploy_begin(sr, "svc", r2))
  end)

  it("a pointer to a deploy that never changed a file does not block the next", function()
    local never = record(root .. "/runs/r0/svc")
    assert(state.write_pointer(sr, "svc", "inflight", never))
    assert.is_true(state.deploy_begin(sr, "svc", record(root .. "/runs/r1/svc")))
  end)

  it("discard removes a directory through one rename", function()
    local d = record(root .. "/store/000001-x")
    assert(fs.write_atomic(d .. "/f", "data"))
    assert.is_true(state.discard(d, root .. "/store/000001-x.trash"))
    assert.is_false(fs.exists(d))
    assert.is_false(fs.exists(root .. "/store/000001-x.trash"))
  end)
end)
