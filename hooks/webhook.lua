-- Example run-wide hook (`--hooks hooks/webhook.lua`): posts failures and rollbacks to a chat
-- webhook (Slack/Mattermost-compatible JSON). Set RRENGINE_WEBHOOK_URL; without it, it stays quiet.
local http = require("rr.http")
local cjson = require("cjson")

local url = os.getenv("RRENGINE_WEBHOOK_URL")

local WORTH_TELLING = {
  SERVICE_RESTART_FAILED = ":x:", ROLLBACK_SUCCESS = ":leftwards_arrow_with_hook:",
  ROLLBACK_FAILED = ":rotating_light:", PLAN_END = ":checkered_flag:",
}

return {
  on_event = function(ev)
    local icon = WORTH_TELLING[ev.event]
    if not url or not icon then return end
    local text = ("%s %s %s %s"):format(icon, ev.event, ev.service or "", ev.error or ev.result or "")
    local res, err = http.request({ method = "POST", url = url, timeout = 5,
      headers = { ["Content-Type"] = "application/json" }, body = cjson.encode({ text = text }) })
    if not res then
      io.stderr:write("webhook: ", err, "\n") -- a chat outage must not fail a restart
    end
  end,
}
