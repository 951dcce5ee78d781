"""What the fleet tells the apps above it (see tether.hooks)."""

from tether.hooks import Hook

# `token=`: a registration token the fleet does not know; a handler that issued it answers
# with an Enrollment (its server, and what to do once the agent has registered).
enrollment_for_token = Hook("enrollment_for_token")

# `agent=, replaced=`: an agent registered (inside the registration's transaction);
# `replaced` when it already existed and its old credentials were just revoked.
agent_registered = Hook("agent_registered")

# `agent=, changed=`: a heartbeat changed what the agent reports of itself (`changed` holds
# the field names, e.g. "version", "rpc_port").
agent_changed = Hook("agent_changed")

# `agent=`: what the answer to a registration carries besides credentials and config; each
# handler returns a dict merged into it.
registration_extras = Hook("registration_extras")
