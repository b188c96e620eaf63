"""libvirt domain XML: element classes over ElementTree and the spec renderer.

May import only ``libvirt_operator.api`` and the standard library.
"""

from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.errors import RenderError
from libvirt_operator.domain.metadata import NAMESPACE as METADATA_NAMESPACE
from libvirt_operator.domain.metadata import OperatorMetadata
from libvirt_operator.domain.naming import default_domain_name
from libvirt_operator.domain.render import render_domain

__all__ = [
    "METADATA_NAMESPACE", "DomainConfig", "OperatorMetadata", "RenderError", "default_domain_name",
    "render_domain",
]
