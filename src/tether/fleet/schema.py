"""OpenAPI description of agent authentication (imported by FleetConfig.ready)."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class AgentTokenScheme(OpenApiAuthenticationExtension):
    target_class = "tether.fleet.authentication.AgentTokenAuthentication"
    name = "agentToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "X-Agent-Token",
            "description": "Agent token (UUID). Signing agents also send X-Tether-Timestamp, "
            "X-Tether-Nonce and X-Tether-Signature; see docs/agent-protocol.md.",
        }
