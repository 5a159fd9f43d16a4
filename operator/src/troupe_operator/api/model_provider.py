"""The ModelProvider API: an OpenAI-compatible endpoint that LLM Agents name.

The spec is the runtime contract's own model (``troupe_runtime.contract.model_provider``),
unchanged: the operator copies it into the runtime config of every Agent that names the
provider. What the contract's validators check and OpenAPI cannot (unique model names, no
header Troupe sets itself) the CRD checks with CEL rules on the whole object
(``MODEL_PROVIDER_RULES``), so the API server and the models refuse alike.
"""

from __future__ import annotations

from pydantic import Field

from troupe_operator.api.common import cel_list, rule
from troupe_operator.api.status import ObjectStatus
from troupe_runtime.contract.model_provider import RESERVED_HEADERS, ModelProviderSpec

MODELS_SHOWN = 32
"""Model ids of the endpoint's list kept in status; a hosted provider lists hundreds."""

MODEL_PROVIDER_RULES = [
    rule(
        "self.spec.models.all(a, self.spec.models.exists_one(b, b.name == a.name))",
        "model names must be unique",
        ".spec.models",
    ),
    rule(
        "!has(self.spec.headers) || self.spec.headers.all(k, "
        f"!(k.lowerAscii() in {cel_list(RESERVED_HEADERS)}))",
        f"headers may not set {', '.join(RESERVED_HEADERS)}: Troupe sets them itself",
        ".spec.headers",
    ),
]
"""What ``ModelProviderSpec``'s validators refuse, in CEL."""


class ModelProviderStatus(ObjectStatus):
    """What the operator's last probe of the endpoint (GET {baseUrl}/models) found."""

    models: list[str] = Field(
        default_factory=list,
        description=f"The model ids the endpoint listed, sorted (at most {MODELS_SHOWN}).",
    )


__all__ = ["MODELS_SHOWN", "MODEL_PROVIDER_RULES", "ModelProviderSpec", "ModelProviderStatus"]
