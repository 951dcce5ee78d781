"""What the command queue tells the apps above it (see tether.hooks)."""

from tether.hooks import Hook

# `command=`: a command reached its final state on the agent's report (inside the report's
# transaction, the row locked): an internal command may have been carrying out a deployment
# or delivering a certificate.
command_finished = Hook("command_finished")
