"""Images of received studies for the chat API and the viewer: ``dicom:study/<uid>`` is the frontal
image the selector chose for the study, ``dicom:instance/<uid>`` one received instance. Pixels go
through ``inference.image.image_from_dataset`` (the same windowing the model saw); a few decoded
images are kept in memory for follow-up questions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.jobstore import JobStore
from inference.api_images import DicomReference, ImageReferenceConflictError, UnknownImageReferenceError
from inference.errors import InputImageError
from inference.image import ModelImage, image_from_dataset


class StudyImages:
    def __init__(self, jobs: JobStore, *, allow_colour: bool = False, cache_size: int = 8) -> None:
        self.jobs = jobs
        self.allow_colour = allow_colour
        self._cache: OrderedDict[str, ModelImage] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def instance_path(self, reference: DicomReference) -> Path:
        if reference.kind == "study":
            study = self.jobs.study(reference.uid)
            if study is None:
                raise UnknownImageReferenceError(f"no study {reference.uid} was received by this node")
            sop = study["selected_sop_instance_uid"]
            if not sop:
                why = f"{study['state']}" + (f": {study['reason']}" if study["reason"] else "")
                raise ImageReferenceConflictError(
                    f"study {reference.uid} has no selected frontal chest image ({why}); "
                    "name one instance with dicom:instance/<SOP Instance UID>")
        else:
            sop = reference.uid
        instance = self.jobs.instance(sop)
        if instance is None:
            raise UnknownImageReferenceError(f"no instance {sop} was received by this node")
        return Path(instance["path"])

    def __call__(self, reference: DicomReference) -> ModelImage:
        path = self.instance_path(reference)
        key = str(path)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        try:
            image = image_from_dataset(dcmread(path), allow_colour=self.allow_colour, file_name=path.name)
        except FileNotFoundError as exc:
            raise ImageReferenceConflictError(f"{reference.url}: the received file is no longer in the spool") from exc
        except (InvalidDicomError, InputImageError) as exc:
            raise ImageReferenceConflictError(f"{reference.url}: not a usable image ({exc})") from exc
        with self._lock:
            self._cache[key] = image
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return image
