"""The settings model. Every field has a safe embedded default; unknown keys are errors.

Sections are added by the package that owns them (the node's network settings, destinations,
the SR writer's options) but all live here so that one file configures one installation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from config.routing import RoutingRule, default_rules

DEFAULT_DATA_DIR = Path("./radvlm-data")
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "inference" / "demo_model" / "phantom-v1"
"""The model shipped inside the `inference` package (editable and wheel installs alike): a small
LlavaOnevision trained on synthetic phantoms — for demonstration and testing, NOT for clinical use.
Sites point ``[model] path`` at the RadVLM weights for real results."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    path: Path = Field(default=DEMO_MODEL_DIR,
                       description="local Hugging Face llava_onevision folder (RadVLM release format); "
                                   "default: the shipped synthetic-phantom demo model (not for clinical use)")
    model_id: str | None = Field(default=None, description="name reported in results; default: folder name")
    version: str | None = Field(default=None, description="version reported in results and SR; "
                                "default: config.json 'radvlm_version', else the weights hash prefix")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPU, float32 on CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    system_prompt: str | None = Field(
        default=None, description="upstream evaluated without a system prompt (docs/model.md)")
    max_new_tokens: int = Field(default=300, ge=1, le=4096)
    vision_backend: Literal["torch", "onnxruntime"] = Field(
        default="torch", description="image encoder (vision tower + projector): torch, or the ONNX export of"
        " `radvlm export-onnx` run by onnxruntime (CUDA provider with onnxruntime-gpu, else CPU);"
        " docs/performance.md has the measured comparison")
    onnx_dir: Path | None = Field(
        default=None, description="folder written by `radvlm export-onnx` (vision.onnx); default: <path>/onnx")


class RemoteEndpoint(_Section):
    """One OpenAI-compatible inference endpoint: `radvlm worker` (one GPU) or vLLM/SGLang serving the
    same weights (docs/scaling.md). Only pixels and prompts are sent to it."""

    url: str = Field(pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
                     description="base URL, e.g. http://gpu1:8000 (the /v1 suffix is optional)")
    token: str | None = Field(default=None, description="bearer token the endpoint expects")
    max_concurrent: int = Field(default=4, ge=1, le=256,
                                description="requests in flight to this endpoint at once (the node never sends more)")
    model: str | None = Field(default=None, description="model name to request; default: the first id the"
                              " endpoint lists on /v1/models")


class InferenceSettings(_Section):
    backend: Literal["local", "remote"] = Field(
        default="local", description="local: the model runs in the node process ([model] path); remote: each"
        " study is sent to one of `endpoints` (OpenAI wire format; docs/scaling.md)")
    endpoints: list[RemoteEndpoint] = Field(default=[], description="the remote endpoints ([[inference.endpoints]])")
    request_timeout_seconds: float = Field(
        default=120.0, gt=0, description="remote backend: one question (connect, send, answer); past it the"
        " endpoint is marked unhealthy and the study's remaining questions go to another endpoint")
    study_timeout_seconds: float = Field(
        default=900.0, gt=0, description="remote backend: every question of one study, failovers included; past"
        " it the study goes back to the queue (deferred, not counted as an attempt)")
    health_check_seconds: float = Field(
        default=10.0, gt=0, description="remote backend: how often every endpoint is probed (GET /v1/models);"
        " an unhealthy endpoint that answers comes back")
    unavailable_retry_seconds: float = Field(
        default=30.0, gt=0, description="remote backend: a study whose endpoints all failed waits this long before"
        " it is taken again (not counted as an attempt)")
    tasks: list[Literal["report", "classification", "grounding"]] = ["report", "classification", "grounding"]
    prefix_reuse: bool = Field(default=True, description="prefill the image once per study, reuse its KV cache")
    max_batch: int = Field(
        default=8, ge=1, le=64, description="most questions answered by one generate call: a study's grounding"
        " questions (local backend) and concurrent requests (`radvlm worker`); 1 = no batching")
    max_batch_wait_ms: float = Field(
        default=10.0, ge=0, le=1000, description="`radvlm worker`: how long the first waiting request waits for"
        " others to join its batch")
    phrase_grounding: bool = Field(default=True, description="ground each finding sentence of the report")
    max_grounding_questions: int = Field(default=16, ge=0, le=64)
    allow_colour: bool = Field(default=False, description="accept RGB DICOM (e.g. secondary capture)")
    max_image_pixels: int = Field(
        default=64_000_000, ge=1, description="largest Rows × Columns decoded (checked before decoding: a few kB of"
        " compressed Pixel Data can declare gigabytes); radiography detectors are ≤ ~20 MP. Decoding takes about"
        " 30 bytes per pixel at its peak (float64 LUT steps), ~2 GB at the default")

    @model_validator(mode="after")
    def _remote_endpoints(self) -> "InferenceSettings":
        if self.backend == "remote" and not self.endpoints:
            raise ValueError('backend = "remote" needs at least one [[inference.endpoints]] entry with a url')
        return self


class NodeTLSSettings(_Section):
    """Optional DICOM TLS (PS3.15 Annex B basic TLS profile) on the SCP port."""

    enabled: bool = False
    certificate: Path | None = Field(default=None, description="PEM server certificate (chain)")
    private_key: Path | None = Field(default=None, description="PEM private key of the certificate")
    ca_certificates: Path | None = Field(
        default=None, description="PEM bundle used to verify client certificates")
    require_client_certificate: bool = Field(
        default=False, description="refuse TLS clients without a certificate signed by ca_certificates")

    @model_validator(mode="after")
    def _complete(self) -> "NodeTLSSettings":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("TLS enabled: set both certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class NodeSettings(_Section):
    """The DICOM node: SCP network settings, spool, job timing, retries and the HTTP endpoint."""

    ae_title: str = Field(default="RADVLM", min_length=1, max_length=16,
                          pattern=r"^[\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$",
                          description="1-16 printable ASCII characters, no backslash")
    port: int = Field(default=11112, ge=0, le=65535, description="0 = any free port (tests)")
    bind: str = "0.0.0.0"
    data_dir: Path = DEFAULT_DATA_DIR
    allowed_calling_ae_titles: list[str] = Field(default=[], description="empty = any calling AE title")
    max_pdu_size: int = Field(default=131072, ge=0, description="largest P-DATA PDU we accept (a longer PDU aborts"
                              " the association); 0 = no PDU limit, max_instance_bytes still applies")
    # limits of the DICOM port (dicom_node/netlimits.py; docs/conformance-statement.md "Resource limits")
    acse_timeout_seconds: float = Field(
        default=10.0, gt=0, description="a connection that has not sent its A-ASSOCIATE-RQ (with TLS: completed"
        " its handshake) within this is closed; senders send it at once")
    dimse_timeout_seconds: float = Field(default=60.0, gt=0, description="wait for a DIMSE message")
    network_timeout_seconds: float = Field(
        default=60.0, gt=0, description="an association (or a socket in the middle of a PDU) idle this long is"
        " closed")
    max_associations: int = Field(default=10, ge=1, description="associations at once, all calling AE titles")
    max_associations_per_calling_ae: int = Field(
        default=4, ge=1, description="associations at once for one calling AE title; more get A-ASSOCIATE-RJ"
        " transient, local limit exceeded")
    reserved_associations: int = Field(
        default=2, ge=0, description="the last N of max_associations only go to a sender holding none yet (by calling"
        " AE title and by IP address), so one sender (or a flood) cannot lock the others out")
    max_connections: int = Field(
        default=64, ge=1, description="open TCP connections on the DICOM port, also those that have not sent an"
        " A-ASSOCIATE-RQ yet; a further connection is closed at once")
    max_connections_per_address: int = Field(
        default=16, ge=1, description="open TCP connections from one IP address; a further one is closed at once")
    max_instance_bytes: int = Field(
        default=128 * 2**20, ge=2**16, description="largest C-STORE data set received (bytes, as encoded): a larger"
        " one is discarded as it arrives and refused with 0xA700; memory per association is about twice this")
    max_inflated_bytes: int = Field(
        default=128 * 2**20, ge=2**16, description="largest inflated size of a Deflated Explicit VR Little Endian"
        " data set; inflated in 1 MiB steps, refused with 0xA700 beyond (decompression bombs)")
    tls: NodeTLSSettings = NodeTLSSettings()
    min_free_space_mb: int = Field(
        default=1024, ge=0, description="below this free space in data_dir, C-STORE answers 0xA700")
    quiet_period_seconds: float = Field(
        default=10.0, ge=0, description="a study is selected once no instance arrived for this long")
    workers: int = Field(default=1, ge=0, le=64, description="inference worker threads (0 = receive only)")
    lease_seconds: float = Field(default=600.0, gt=0, description="a job lease older than this is taken again")
    max_inference_attempts: int = Field(
        default=3, ge=1, description="processing errors (model, image, result writer) before a study is failed;"
        " a node crash or lost lease does not count here")
    max_interrupted_attempts: int = Field(
        default=5, ge=1, description="inference runs of one study cut short by a node crash or an expired lease"
        " before it is failed (a study that crashes the node ends; an innocent one survives restarts)")
    io_retry_seconds: float = Field(
        default=30.0, gt=0, description="after a disk error (ENOSPC, EIO) writing results, the study waits this"
        " long and is taken again, not counted as an attempt")
    selection_stall_seconds: float = Field(
        default=300.0, gt=0, description="/healthz reports degraded when a study has waited for selection longer"
        " than quiet_period_seconds + this")
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    max_delivery_tries: int = Field(default=10, ge=1, description="then the delivery is dead-lettered")
    retry_base_seconds: float = Field(default=5.0, gt=0, description="first retry delay; doubles each try")
    retry_max_seconds: float = Field(default=900.0, gt=0, description="cap of the retry delay")
    delivery_timeout_seconds: float = Field(
        default=60.0, gt=0, description="deadline of one delivery try (connect, association or HTTP request, every"
        " object, the answer); then it fails and is retried with backoff. Each destination has its own delivery"
        " thread: a hung destination never delays the others")
    delivery_connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="TCP connect to a dicom/dicomweb/fhir destination (within the deadline)")
    delivery_lease_seconds: float | None = Field(
        default=None, gt=0, description="a delivery in progress longer than this is taken again (sender died);"
        " default 4 × delivery_timeout_seconds + 60")
    allow_demo_model_delivery: bool = Field(
        default=False, description="deliver results of the shipped phantom demo model to dicom, dicomweb and fhir"
        " destinations too; off: those deliveries are refused (dead-lettered with the reason), folder"
        " destinations are unaffected")
    http_port: int = Field(default=8089, ge=0, le=65535, description="/healthz and /metrics; 0 = any free port")
    http_bind: str = "127.0.0.1"
    http_enabled: bool = True
    http_token: str | None = Field(default=None, description="bearer token required for /metrics when set")
    audit_log: Path | None = Field(default=None, description="JSON lines audit log; default data_dir/audit.jsonl")

    @model_validator(mode="after")
    def _association_limits(self) -> "NodeSettings":
        if self.reserved_associations >= self.max_associations:
            raise ValueError(f"reserved_associations ({self.reserved_associations}) must be below max_associations"
                             f" ({self.max_associations})")
        return self


class _DestinationBase(_Section):
    name: str | None = Field(default=None, description="shown by `radvlm outbox list`; default kind+address")


class DicomDestination(_DestinationBase):
    kind: Literal["dicom"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(min_length=1, max_length=16)
    calling_ae_title: str | None = Field(default=None, max_length=16, description="default: node.ae_title")
    tls: bool = False
    ca_certificates: Path | None = None


class DicomWebDestination(_DestinationBase):
    kind: Literal["dicomweb"]
    url: str = Field(description="DICOMweb root; STOW-RS posts to {url}/studies")
    token: str | None = Field(default=None, description="bearer token")


class FhirDestination(_DestinationBase):
    kind: Literal["fhir"]
    url: str = Field(description="FHIR R4 base; the transaction Bundle is POSTed to it")
    token: str | None = Field(default=None, description="bearer token")
    mode: Literal["transaction", "upsert"] = Field(
        default="transaction",
        description="transaction: POST the Bundle to the base; upsert: PUT each resource as Type/id"
                    " (servers without transaction support)")
    max_entries_per_transaction: int = Field(
        default=50, ge=1, description="a larger bundle is sent as several transactions of idempotent PUTs"
                                      " (Medplum refuses more than 50 updates in one)")


class FolderDestination(_DestinationBase):
    kind: Literal["folder"]
    path: Path


DestinationSettings = Annotated[
    DicomDestination | DicomWebDestination | FhirDestination | FolderDestination,
    Field(discriminator="kind"),
]


class SRSettings(_Section):
    """Options of the result writers (sr_writer): DICOM SR, GSPS and FHIR (design §3)."""

    manufacturer: str = Field(default="RadVLM PACS node", max_length=64,
                              description="Manufacturer (0008,0070) of the SR/GSPS and the FHIR Device")
    manufacturer_model_name: str = Field(default="radvlm-pacs", max_length=64)
    software_version: str = Field(default="0.1.0", max_length=64)
    device_serial_number: str = Field(default="RADVLM-0", max_length=64)
    institution_name: str | None = Field(default=None, max_length=64)
    institutional_department_name: str | None = Field(default=None, max_length=64)
    uid_root: str | None = Field(
        default=None, pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40,
        description="org UID root ending in '.' for derived UIDs; default: 2.25.<UUID> UIDs")
    series_description: str = Field(
        default="UNVERIFIED AI RESULT - not for diagnostic use without review", max_length=64)
    sr_series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    gsps_enabled: bool = Field(default=True, description="also write a GSPS overlay of the boxes")
    gsps_series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    fhir_patient_identifier_system: str | None = Field(
        default=None, min_length=1,
        description="Patient.identifier system (the EHR's MRN namespace URI) when the DICOM carries no ISO "
                    "issuer OID; required with a fhir destination; unset: identifier without system (docs/fhir.md)")
    fhir_without_patient_id: Literal["skip", "no-subject"] = Field(
        default="skip",
        description="source with an empty Patient ID (legal, Type 2): skip = no FHIR bundle, the reason recorded "
                    "(SR/GSPS still written); no-subject = a bundle without Patient/subject/ImagingStudy")
    fhir_code_system_base: str = Field(
        default="https://radvlm.invalid/fhir/CodeSystem",
        description="base URL of the node's own FHIR code systems (box components; docs/codes.md)")
    fhir_include_patient: bool = Field(
        default=True, description="put the Patient (PUT Patient/<id from its identifier>) in the bundle")


class ApiSettings(_Section):
    """The OpenAI-compatible chat API and the web viewer (served by `radvlm serve` on the node's
    HTTP port, and by `radvlm worker`). Without a token they answer 503: images are patient data."""

    token: str | None = Field(default=None, description="bearer token for /v1/* and the viewer's /api/*;"
                              " unset = those endpoints are disabled (env RADVLM_API__TOKEN)")
    max_request_bytes: int = Field(default=32 * 2**20, ge=1024,
                                   description="larger request bodies are refused with 413")
    cors_origins: list[str] = Field(default=[], description="origins allowed by CORS; empty = no CORS headers")
    max_messages: int = Field(default=64, ge=1, description="most messages in one chat request")
    image_cache_size: int = Field(default=4, ge=1, le=64,
                                  description="encoded images (KV prefixes) kept for follow-up questions")
    viewer_enabled: bool = Field(default=True, description="serve the web viewer at /viewer/ on the node")


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    inference: InferenceSettings = InferenceSettings()
    node: NodeSettings = NodeSettings()
    sr: SRSettings = SRSettings()
    api: ApiSettings = ApiSettings()
    destinations: list[DestinationSettings] = Field(
        default=[], description="where results go: dicom | dicomweb | fhir | folder")
    rules: list[RoutingRule] = Field(
        default_factory=default_rules, min_length=1,
        description="routing rules, first match wins (config.routing, docs/operations.md); default: infer all")

    @field_validator("rules")
    @classmethod
    def _rule_destinations(cls, rules: list[RoutingRule], info: ValidationInfo) -> list[RoutingRule]:
        # a field validator (not a model one): an error quotes the rules only, never the whole configuration
        destinations = info.data.get("destinations") or []
        names = {d.name for d in destinations if d.name}
        for index, rule in enumerate(rules):
            unknown = [n for n in rule.destinations or [] if n not in names]
            if unknown:
                raise ValueError(f"rules[{index}] {rule.name!r}: destinations: {unknown} not among the named"
                                 f" [[destinations]] ({', '.join(sorted(names)) or 'none has a name'})")
            if rule.action == "forward":
                fhir = [d.name for d in destinations if d.name in (rule.destinations or ()) and d.kind == "fhir"]
                if fhir:
                    raise ValueError(f"rules[{index}] {rule.name!r}: destinations: {fhir} are fhir destinations;"
                                     " 'forward' sends source DICOM instances (dicom, dicomweb or folder only)")
        return rules

    @model_validator(mode="after")
    def _fhir_patient_system(self) -> "Settings":
        if any(d.kind == "fhir" for d in self.destinations) and not self.sr.fhir_patient_identifier_system:
            raise ValueError("a fhir destination needs [sr] fhir_patient_identifier_system: the EHR's Patient "
                             "identifier (MRN) system URI, used when the DICOM carries no ISO issuer OID "
                             "(docs/fhir.md)")
        return self
