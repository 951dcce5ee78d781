"""Background jobs of the deploy app, run by the Tasks worker (in `tether serve` by default,
or `tether worker`)."""

import logging

from django_tasks import task

from . import services
from .models import Deployment
from .ssh import run_ssh_deployment

log = logging.getLogger("tether.deploy")


@task()
def run_ssh_deployment_task(deployment_id: int) -> None:
    """Run one SSH deployment. Whatever goes wrong ends the deployment `failed` with a line in
    its log, so an operator watching it is never left with one that runs forever."""
    try:
        run_ssh_deployment(deployment_id)
    except Exception as exc:
        log.exception("SSH deployment %s failed", deployment_id)
        deployment = Deployment.objects.filter(pk=deployment_id).first()
        if deployment is not None:
            services.finish_deployment(
                deployment=deployment,
                status=Deployment.Status.FAILED,
                line=f"failed: internal error ({type(exc).__name__}); see the server log",
            )
