"""The web viewer: a static page (``static/``, plain HTML/JS, no build step) at ``/viewer/`` and
its token-protected data under ``/api/studies`` (routes.py)."""

from dicom_node.viewer.routes import mount_viewer

__all__ = ["mount_viewer"]
