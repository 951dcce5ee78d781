"""What a deployment's end tells the modules of this app above services (see tether.hooks):
`services` sits below `lifecycle` and `rollouts`, which it must not import."""

from tether.hooks import Hook

# `deployment=`: a deployment ended (fired once its transaction has committed).
deployment_finished = Hook("deployment_finished")
