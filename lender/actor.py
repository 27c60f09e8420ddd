"""The lender as a Ray actor: one per GPU (or host pool), named
``LENDER_ACTOR_PREFIX + lender id``, restarted by Ray when it dies."""

from __future__ import annotations

import dataclasses
import os

from harvestd.paths import StateDir
from lender.config import LenderConfig
from lender.lender import Lender

LENDER_ACTOR_PREFIX = "harvest-lender-"


def lender_actor_class():
    """The lender as a Ray actor class (built lazily so that importing needs no Ray).

    It asks Ray for no GPU: lending must not take the GPU away from Ray's scheduler,
    and the lender finds its GPU by UUID, whatever ``CUDA_VISIBLE_DEVICES`` says.
    """
    import ray

    @ray.remote(num_cpus=0, num_gpus=0, max_restarts=-1, max_task_retries=0)
    class LenderActor:
        """One lender in a Ray actor; Ray restarts it, and it registers again under a new
        generation (its old leases are revoked: their memory died with it)."""

        def __init__(self, config: LenderConfig) -> None:
            from harvestd.logs import setup_logging

            if config.cuda_visible_devices is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices

            setup_logging(
                StateDir.resolve(config.state_dir).logs_dir / f"lender-{config.lender_id}.log",
                config.log_level,
                config.log_format,
            )
            config = dataclasses.replace(
                config, ray_node_id=ray.get_runtime_context().get_node_id()
            )
            self.lender = Lender(config).start()

        def info(self) -> dict:
            """See :meth:`Lender.info`."""
            return self.lender.info()

        def shutdown(self) -> None:
            """Stop lending (the actor is killed after)."""
            self.lender.stop()

    return LenderActor
