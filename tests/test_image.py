"""inference.image: DICOM / PNG / JPEG → 8-bit display-sense pixels (design §3 "Pixels").

Real CR data from pydicom-data plus synthetic datasets from tests/dicom_samples.py. Expected
8-bit values are written out from the DICOM formulas (PS3.3 C.11.2.1.2 / C.11.2.1.3), not
derived from the code under test.
"""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from inference.errors import (
    ColourImageError,
    InputImageError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UndecodablePixelDataError,
)
from inference.image import ModelImage, image_from_dataset, load_image
from inference.result import SourceImage
from tests.dicom_samples import (
    DEFAULT_PATIENT_ID,
    DEFAULT_PATIENT_NAME,
    chest_phantom,
    encapsulate_jpeg_baseline,
    make_cr_dataset,
    make_multiframe_dataset,
    make_sr_dataset,
    ramp,
    write,
)


def row(*values: int, dtype=np.uint16) -> np.ndarray:
    """A 1 × n pixel array with exactly these stored values."""
    return np.array([values], dtype=dtype)


def linear_window(x, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) as a 0..255 display value, written out independently."""
    x = np.asarray(x, dtype=np.float64)
    fraction = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    fraction[x <= center - 0.5 - (width - 1) / 2] = 0.0
    fraction[x > center - 0.5 + (width - 1) / 2] = 1.0
    return np.rint(fraction * 255).astype(np.uint8)


def assert_no_patient_identifiers(text: str) -> None:
    assert DEFAULT_PATIENT_ID not in text
    assert DEFAULT_PATIENT_NAME.split("^")[0] not in text


# ----------------------------------------------------------------------------- real chest CR


@pytest.fixture(scope="module")
def rg1_uncr() -> ModelImage:
    return load_image(get_testdata_file("RG1_UNCR.dcm"))


def test_real_cr_keeps_geometry_and_uids(rg1_uncr: ModelImage) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert rg1_uncr.pixels.shape == (1955, 1841) == (ds.Rows, ds.Columns)
    assert rg1_uncr.pixels.dtype == np.uint8
    src = rg1_uncr.source
    assert (src.rows, src.columns) == (1955, 1841)
    assert src.sop_instance_uid == ds.SOPInstanceUID
    assert src.study_instance_uid == ds.StudyInstanceUID
    assert src.series_instance_uid == ds.SeriesInstanceUID
    assert src.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"
    assert (src.photometric_interpretation, src.bits_stored, src.view_position) == (
        "MONOCHROME1", 15, "PA")
    assert src.file_name == "RG1_UNCR.dcm"
    dumped = src.model_dump_json()
    assert str(ds.PatientID) not in dumped and "CompressedSamples" not in dumped


def test_real_cr_window_then_monochrome1_inversion_exact(rg1_uncr: ModelImage) -> None:
    """RG1 has window 15000/30000 (LINEAR) and is MONOCHROME1: 255 − windowed, pixel for pixel."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (15000.0, 30000.0)
    expected = 255 - linear_window(ds.pixel_array, 15000, 30000)
    np.testing.assert_array_equal(rg1_uncr.pixels, expected)
    as_mono2 = copy.deepcopy(ds)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(image_from_dataset(as_mono2).pixels, 255 - rg1_uncr.pixels)


def test_real_cr_display_sense_lungs_dark_mediastinum_bright(rg1_uncr: ModelImage) -> None:
    p = rg1_uncr.pixels.astype(np.float64)
    right_lung, left_lung = p[400:1000, 300:650].mean(), p[400:1000, 1200:1550].mean()
    mediastinum = p[500:1500, 830:1000].mean()
    assert mediastinum > right_lung + 40 and mediastinum > left_lung + 40
    raw = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array[::8, ::8]
    # MONOCHROME1: high stored value = dark, so display values fall as stored values rise
    assert np.corrcoef(raw.ravel(), rg1_uncr.pixels[::8, ::8].ravel())[0, 1] < -0.95


def test_real_cr_jpeg2000_lossless_equals_uncompressed(rg1_uncr: ModelImage) -> None:
    j2k = load_image(get_testdata_file("RG1_J2KR.dcm"))
    assert j2k.source.file_name == "RG1_J2KR.dcm"
    np.testing.assert_array_equal(j2k.pixels, rg1_uncr.pixels)


# ----------------------------------------------------------------------------- VOI / modality


def test_8bit_monochrome2_without_voi_is_identity() -> None:
    values = ramp(16, 16, 0, 255, np.uint8)
    image = image_from_dataset(make_cr_dataset(pixel_array=values, bits_stored=8))
    np.testing.assert_array_equal(image.pixels, values)
    assert image.source.bits_stored == 8


def test_12bit_without_voi_scales_actual_min_max() -> None:
    values = row(1000, 1500, 2000, 3000)
    image = image_from_dataset(make_cr_dataset(pixel_array=values, bits_stored=12))
    np.testing.assert_array_equal(image.pixels, [[0, 64, 128, 255]])  # (x−1000)/2000·255


def test_window_centre_2048_width_4096_on_a_12bit_ramp() -> None:
    values = row(0, 1, 16, 2048, 4094, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    # LINEAR: ((x − 2047.5)/4095 + 0.5) = x/4095 → rint(255·x/4095)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 0, 1, 128, 255, 255]])


def test_linear_window_clips_below_and_above() -> None:
    values = row(0, 512, 513, 768, 1024, 1535, 1536, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=1024, WindowWidth=1024)
    pixels = image_from_dataset(ds).pixels
    np.testing.assert_array_equal(pixels, [[0, 0, 0, 64, 128, 255, 255, 255]])
    np.testing.assert_array_equal(pixels, linear_window(values, 1024, 1024))


def test_only_the_first_of_several_windows_is_used() -> None:
    values = ramp(32, 32, 0, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12,
                         WindowCenter=[1024, 3000], WindowWidth=[1024, 500])
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, linear_window(values, 1024, 1024))


def test_linear_exact_window() -> None:
    values = row(0, 512, 768, 1280, 1536, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=1024, WindowWidth=1024,
                         VOILUTFunction="LINEAR_EXACT")
    # (x − 1024)/1024 + 0.5: 768 → 0.25, 1280 → 0.75, 1536 → 1.0
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 0, 64, 191, 255, 255]])


def test_sigmoid_window() -> None:
    values = row(0, 1536, 2560, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=2048, WindowWidth=1024,
                         VOILUTFunction="SIGMOID")
    expected = np.rint(255 / (1 + np.exp(-4 * (values.astype(float) - 2048) / 1024))).astype(np.uint8)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, expected)
    np.testing.assert_array_equal(expected, [[0, 30, 225, 255]])


def test_unusable_window_falls_back_to_min_max(caplog: pytest.LogCaptureFixture) -> None:
    values = row(1000, 1500, 2000, 3000)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=2000, WindowWidth=0)
    with caplog.at_level(logging.WARNING, logger="inference.image"):
        pixels = image_from_dataset(ds).pixels
    np.testing.assert_array_equal(pixels, [[0, 64, 128, 255]])
    assert "window not usable" in caplog.text and ds.SOPInstanceUID in caplog.text


def test_empty_window_values_mean_no_window() -> None:
    values = row(1000, 1500, 2000, 3000)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter="", WindowWidth="")
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 64, 128, 255]])


def _voi_lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def test_voi_lut_sequence_8bit_with_4096_entries_wins_over_window() -> None:
    """An 8-bit VOI LUT with 4096 entries (pydicom 3.0.2's apply_voi wraps indices ≥ 256)."""
    values = row(0, 255, 256, 300, 2048, 4095)
    lut = [255 - i // 16 for i in range(4096)]
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=100, WindowWidth=10,
                         VOILUTSequence=[_voi_lut_item([4096, 0, 8], lut)])
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[255, 240, 239, 237, 127, 0]])


def test_voi_lut_sequence_16bit_with_first_mapped_value() -> None:
    values = row(0, 999, 1000, 1001, 2047, 3047, 4095)
    lut = [i * 32 for i in range(2048)]  # 0..65504 over inputs 1000..3047
    ds = make_cr_dataset(pixel_array=values, bits_stored=12,
                         VOILUTSequence=[_voi_lut_item([2048, 1000, 16], lut)])
    expected = np.rint(np.array([0, 0, 0, 32, 1047 * 32, 2047 * 32, 2047 * 32]) * 255 / 65535)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [expected.astype(np.uint8)])


@pytest.mark.parametrize("descriptor", [[4, -2, 16], [4, 65534, 16]],
                         ids=["ss", "us-twos-complement"])
def test_voi_lut_with_negative_first_mapped_value_on_signed_pixels(descriptor) -> None:
    values = row(-3, -2, -1, 0, 1, 2, dtype=np.int16)
    ds = make_cr_dataset(pixel_array=values, bits_stored=16,
                         VOILUTSequence=[_voi_lut_item(descriptor, [0, 100, 50000, 65535])])
    # index = x − (−2), clipped to 0..3 → entries 0, 0, 100, 50000, 65535, 65535
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 0, 0, 195, 255, 255]])


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")  # pydicom re-types SS
def test_voi_lut_with_more_than_32767_entries_read_as_ss() -> None:
    values = row(0, 20000, 39999, 50000)
    lut = [i // 157 for i in range(40000)]  # 0..254
    item = Dataset()
    item.add_new("LUTDescriptor", "SS", [40000 - 65536, 0, 8])  # how an SS reading sees 40000
    item.LUTData = lut
    ds = make_cr_dataset(pixel_array=values, bits_stored=16, VOILUTSequence=[item])
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 127, 254, 254]])


def test_voi_lut_as_ow_bytes_read_back_from_a_file(tmp_path) -> None:
    values = row(0, 1, 2, 3)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.add_new("LUTData", "OW", np.array([0, 65535, 32768, 100], dtype="<u2").tobytes())
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, VOILUTSequence=[item])
    image = load_image(write(ds, tmp_path / "voi_ow.dcm"))
    np.testing.assert_array_equal(image.pixels, [[0, 255, 128, 0]])


def test_rescale_slope_intercept_then_window() -> None:
    values = row(0, 500, 750, 1000, 1500, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, RescaleSlope=2,
                         RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2000)
    modality = values.astype(float) * 2 - 1000
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, linear_window(modality, 1000, 2000))
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 0, 64, 128, 255, 255]])


def test_negative_rescale_slope_keeps_high_modality_values_bright() -> None:
    """With slope −1 pydicom's windowing output range runs backwards (y_min > y_max)."""
    values = row(0, 16, 2047, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, RescaleSlope=-1,
                         RescaleIntercept=4095, WindowCenter=2048, WindowWidth=4096)
    modality = 4095 - values.astype(float)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, linear_window(modality, 2048, 4096))
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[255, 254, 128, 0]])


def test_modality_lut_sequence_then_window() -> None:
    values = row(0, 1, 2048, 4095)
    item = _voi_lut_item([4096, 0, 16], [i * 16 for i in range(4096)])
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, ModalityLUTSequence=[item],
                         WindowCenter=32768, WindowWidth=65536)
    modality = values.astype(float) * 16
    expected = linear_window(modality, 32768, 65536)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, expected)
    np.testing.assert_array_equal(expected, [[0, 0, 128, 255]])


def test_signed_16bit_without_voi() -> None:
    values = row(-32768, -1, 0, 32767, dtype=np.int16)
    ds = make_cr_dataset(pixel_array=values, bits_stored=16)
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 127, 128, 255]])


def test_signed_12bit_with_window_uses_signed_range() -> None:
    values = row(-2048, -1, 0, 2047, dtype=np.int16)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12, WindowCenter=0, WindowWidth=4096,
                         RescaleSlope=1, RescaleIntercept=0)
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, linear_window(values, 0, 4096))
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 127, 128, 255]])


@pytest.mark.parametrize("bits_stored", [8, 10, 12, 14, 15, 16])
def test_any_bits_stored_maps_full_range_to_0_255(bits_stored: int) -> None:
    top = (1 << bits_stored) - 1
    ds = make_cr_dataset(rows=8, columns=8, bits_stored=bits_stored)
    pixels = image_from_dataset(ds).pixels
    assert (pixels[0, 0], pixels[-1, -1]) == (0, 255)
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)
    assert ds.pixel_array.max() == top


def test_monochrome1_is_inverted_after_voi() -> None:
    values = row(0, 512, 768, 1024, 4095)
    mono1 = make_cr_dataset(pixel_array=values, bits_stored=12, photometric="MONOCHROME1",
                            WindowCenter=1024, WindowWidth=1024)
    np.testing.assert_array_equal(image_from_dataset(mono1).pixels,
                                  255 - linear_window(values, 1024, 1024))
    no_voi = make_cr_dataset(pixel_array=ramp(8, 8, 0, 255, np.uint8), bits_stored=8,
                             photometric="MONOCHROME1")
    np.testing.assert_array_equal(image_from_dataset(no_voi).pixels, 255 - ramp(8, 8, 0, 255, np.uint8))


def test_monochrome1_phantom_shows_dark_lungs() -> None:
    phantom = chest_phantom(64, 64, 12)
    ds = make_cr_dataset(pixel_array=4095 - phantom, bits_stored=12, photometric="MONOCHROME1")
    pixels = image_from_dataset(ds).pixels
    assert pixels[32, 19] < 60 and pixels[32, 32] > 200  # lung vs mediastinum
    np.testing.assert_array_equal(pixels, image_from_dataset(make_cr_dataset(
        pixel_array=phantom, bits_stored=12)).pixels)


def test_dataset_is_not_modified() -> None:
    ds = make_cr_dataset(bits_stored=12, RescaleSlope="1.0", RescaleIntercept="0",
                         WindowCenter="2048.0", WindowWidth="4096")
    before = copy.deepcopy(ds)
    image_from_dataset(ds)
    assert ds == before
    assert ds["WindowCenter"].value == before["WindowCenter"].value


def test_in_memory_dataset_without_file_meta_decodes() -> None:
    ds = make_cr_dataset(pixel_array=row(0, 4095), bits_stored=12)
    del ds.file_meta
    np.testing.assert_array_equal(image_from_dataset(ds).pixels, [[0, 255]])


# ----------------------------------------------------------------------------- transfer syntaxes


@pytest.fixture(scope="module")
def phantom_reference() -> ModelImage:
    return image_from_dataset(make_cr_dataset(pixel_array=chest_phantom(48, 40, 12),
                                              bits_stored=12, WindowCenter=2000, WindowWidth=3000))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless],
                         ids=["rle", "jpeg-ls", "jpeg2000"])
def test_lossless_compressed_files_equal_uncompressed(syntax, tmp_path, phantom_reference) -> None:
    ds = make_cr_dataset(pixel_array=chest_phantom(48, 40, 12), bits_stored=12,
                         WindowCenter=2000, WindowWidth=3000)
    ds.compress(syntax, generate_instance_uid=False)
    path = write(ds, tmp_path / "compressed.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_image(path).pixels, phantom_reference.pixels)


def test_signed_16bit_jpeg_ls_equals_uncompressed(tmp_path) -> None:
    values = ramp(16, 16, -30000, 30000, np.int16)
    plain = image_from_dataset(make_cr_dataset(pixel_array=values, bits_stored=16))
    ds = make_cr_dataset(pixel_array=values, bits_stored=16)
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    np.testing.assert_array_equal(load_image(write(ds, tmp_path / "s.dcm")).pixels, plain.pixels)


def test_jpeg_baseline_decodes_like_pillow(tmp_path) -> None:
    ds = make_cr_dataset(pixel_array=chest_phantom(48, 40, 8), bits_stored=8)
    encapsulate_jpeg_baseline(ds)
    path = write(ds, tmp_path / "baseline.dcm")
    frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    by_pillow = np.asarray(Image.open(io.BytesIO(frame)).convert("L"), dtype=np.int16)
    image = load_image(path)
    # no VOI: min..max of the decoded values; decoders may differ by one in the IDCT
    expected = np.rint((by_pillow - by_pillow.min()) / np.ptp(by_pillow) * 255)
    assert np.abs(image.pixels - expected).max() <= 2


def test_deflated_transfer_syntax(tmp_path, phantom_reference) -> None:
    ds = make_cr_dataset(pixel_array=chest_phantom(48, 40, 12), bits_stored=12,
                         WindowCenter=2000, WindowWidth=3000,
                         transfer_syntax=DeflatedExplicitVRLittleEndian)
    path = write(ds, tmp_path / "deflated.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(load_image(path).pixels, phantom_reference.pixels)


@pytest.mark.parametrize("layout", ["part10", "no_preamble", "dataset_only"])
def test_dicom_with_or_without_preamble_and_meta(layout, tmp_path) -> None:
    values = row(0, 1000, 4095)
    ds = make_cr_dataset(pixel_array=values, bits_stored=12)
    path = write(ds, tmp_path / "image.bin", layout=layout)
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, [[0, 62, 255]])
    assert image.source.sop_instance_uid == ds.SOPInstanceUID


# ----------------------------------------------------------------------------- refusals


def test_multi_frame_is_refused(tmp_path) -> None:
    path = write(make_multiframe_dataset(frames=3), tmp_path / "mf.dcm")
    with pytest.raises(MultiFrameError, match="3 frames") as info:
        load_image(path)
    assert "mf.dcm" in str(info.value)
    single = make_cr_dataset(NumberOfFrames=1)
    assert image_from_dataset(single).pixels.shape == (64, 48)


def test_sr_has_no_pixel_data(tmp_path) -> None:
    ds = make_sr_dataset()
    with pytest.raises(NoPixelDataError) as info:
        load_image(write(ds, tmp_path / "report.dcm"))
    message = str(info.value)
    assert "Basic Text SR" in message and ds.SOPInstanceUID in message and "report.dcm" in message
    assert_no_patient_identifiers(message)


def test_rgb_is_refused_unless_allowed() -> None:
    ds = make_cr_dataset(rows=8, columns=8, bits_stored=8, photometric="RGB")
    with pytest.raises(ColourImageError, match="RGB") as info:
        image_from_dataset(ds)
    assert ds.SOPInstanceUID in str(info.value)
    assert_no_patient_identifiers(str(info.value))
    rgb = ds.pixel_array.astype(np.float64)
    expected = np.rint(rgb @ [0.299, 0.587, 0.114]).astype(np.uint8)
    image = image_from_dataset(ds, allow_colour=True)
    np.testing.assert_array_equal(image.pixels, expected)
    assert image.pixels.shape == (8, 8)


def test_ybr_full_is_converted_to_luminance_when_allowed() -> None:
    rgb = make_cr_dataset(rows=8, columns=8, bits_stored=8, photometric="RGB").pixel_array
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = make_cr_dataset(pixel_array=ybr, bits_stored=8, photometric="YBR_FULL")
    with pytest.raises(ColourImageError):
        image_from_dataset(ds)
    luminance = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(image_from_dataset(ds, allow_colour=True).pixels - luminance).max() <= 2


def test_truncated_native_pixel_data_is_undecodable(tmp_path) -> None:
    ds = make_cr_dataset()
    data = write(ds, tmp_path / "full.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-1000])
    with pytest.raises(UndecodablePixelDataError, match="cut.dcm") as info:
        load_image(cut)
    assert isinstance(info.value.__cause__, ValueError)
    assert_no_patient_identifiers(str(info.value))


def test_truncated_encapsulated_file_is_undecodable_not_no_pixels(tmp_path) -> None:
    ds = make_cr_dataset(pixel_array=chest_phantom(48, 40, 12), bits_stored=12)
    ds.compress(RLELossless, generate_instance_uid=False)
    data = write(ds, tmp_path / "full.dcm").read_bytes()
    for layout_offset, name in ((0, "cut.dcm"), (132, "cut_no_preamble.dcm")):
        cut = tmp_path / name
        cut.write_bytes(data[layout_offset: len(data) - 100])  # ends inside the RLE fragment
        # pydicom warns and returns an empty data set: must not read as "no pixel data"
        with pytest.warns(UserWarning, match="End of file"):
            with pytest.raises(UndecodablePixelDataError, match=f"{name}.*truncated"):
                load_image(cut)


def test_corrupt_jpeg2000_and_unknown_syntax_are_undecodable(tmp_path) -> None:
    ds = make_cr_dataset()  # 64 × 48: openjpeg refuses tiny images at its default resolutions
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    with pytest.raises(UndecodablePixelDataError, match="JPEG 2000") as info:
        image_from_dataset(ds, file_name="broken.dcm")
    assert info.value.__cause__ is not None and "broken.dcm" in str(info.value)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    with pytest.raises(UndecodablePixelDataError, match="MPEG2"):
        image_from_dataset(ds)


def test_pixel_data_without_image_pixel_module_is_not_an_image() -> None:
    ds = make_sr_dataset(PixelData=b"\x00\x00")
    with pytest.raises(NotAnImageError, match="Rows/Columns"):
        image_from_dataset(ds)


@pytest.mark.parametrize("content", [
    b"",
    b"hello, this is a text file\n" * 10,
    bytes(range(256)) * 4,
    b"GIF89a" + b"\x00" * 200,
])
def test_non_image_files_are_refused(content: bytes, tmp_path) -> None:
    path = tmp_path / "thing.dcm"
    path.write_bytes(content)
    with pytest.raises(NotAnImageError, match="thing.dcm"):
        load_image(path)


def test_missing_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputImageError, match="nope.dcm"):
        load_image(tmp_path / "nope.dcm")


# ----------------------------------------------------------------------------- PNG / JPEG


def test_png_8bit_by_content_not_extension(tmp_path) -> None:
    values = ramp(20, 30, 0, 255, np.uint8)
    path = tmp_path / "actually_png.dcm"
    Image.fromarray(values).save(path, format="PNG")
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, values)
    assert image.source == SourceImage(rows=20, columns=30, bits_stored=8,
                                       file_name="actually_png.dcm")


def test_png_16bit_scales_min_max(tmp_path) -> None:
    values = row(1000, 1500, 2000, 3000)
    path = tmp_path / "wide.png"
    Image.fromarray(values.astype(np.uint16)).save(path)
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, [[0, 64, 128, 255]])
    assert image.source.bits_stored == 16


def test_colour_png_and_jpeg_become_grayscale(tmp_path) -> None:
    rgb = np.stack([ramp(16, 16, 0, 255, np.uint8)] * 3, axis=-1)
    rgb[..., 0] = 200
    png, jpg = tmp_path / "c.png", tmp_path / "c.jpg"
    Image.fromarray(rgb).save(png)
    Image.fromarray(rgb).save(jpg, quality=95)
    np.testing.assert_array_equal(load_image(png).pixels,
                                  np.asarray(Image.fromarray(rgb).convert("L")))
    jpeg_image = load_image(jpg)
    assert jpeg_image.pixels.shape == (16, 16)
    assert np.abs(jpeg_image.pixels.astype(int) - load_image(png).pixels).max() <= 8


def test_dicom_named_png_is_read_as_dicom(tmp_path) -> None:
    ds = make_cr_dataset(pixel_array=row(0, 4095), bits_stored=12)
    assert load_image(write(ds, tmp_path / "image.png")).source.sop_instance_uid == ds.SOPInstanceUID


def test_truncated_png_is_undecodable(tmp_path) -> None:
    path = tmp_path / "cut.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:-200])
    with pytest.raises(UndecodablePixelDataError, match="cut.png"):
        load_image(path)


# ----------------------------------------------------------------------------- ModelImage


def test_model_image_contract() -> None:
    ds = make_cr_dataset(rows=10, columns=7, bits_stored=12)
    image = image_from_dataset(ds)
    assert image.pixels.shape == (10, 7) and not image.pixels.flags.writeable
    rgb = image.to_pil_rgb()
    assert rgb.mode == "RGB" and rgb.size == (7, 10)
    arr = np.asarray(rgb)
    for channel in range(3):
        np.testing.assert_array_equal(arr[..., channel], image.pixels)
    with pytest.raises(ValueError):
        ModelImage(pixels=np.zeros((3, 3), np.uint8), source=image.source)
    with pytest.raises(TypeError):
        ModelImage(pixels=np.zeros((10, 7), np.uint16), source=image.source)
    assert_no_patient_identifiers(image.source.model_dump_json())


# ----------------------------------------------------------------------------- more real files


def test_real_jpeg_lossless_process14_decodes() -> None:
    path = get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm")
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert image.pixels.shape == (ds.Rows, ds.Columns) == (768, 1024)
    assert (int(ds.WindowCenter), int(ds.WindowWidth)) == (127, 254)
    np.testing.assert_array_equal(image.pixels, linear_window(ds.pixel_array, 127, 254))


@pytest.mark.parametrize("name,error", [
    ("OBXXXX1A.dcm", ColourImageError),          # PALETTE COLOR
    ("SC_rgb_jpeg_dcmtk.dcm", ColourImageError),  # JPEG baseline YBR_FULL
    ("emri_small.dcm", MultiFrameError),          # 10-frame MR
    ("rtplan.dcm", NoPixelDataError),             # RT Plan: no pixels
])
def test_real_files_that_are_refused(name: str, error: type[InputImageError]) -> None:
    with pytest.raises(error, match=name):
        load_image(get_testdata_file(name))


def test_real_palette_colour_accepted_as_luminance() -> None:
    path = get_testdata_file("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    top = np.iinfo(rgb.dtype).max
    expected = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / top * 255).astype(np.uint8)
    image = load_image(path, allow_colour=True)
    assert image.source.photometric_interpretation == "PALETTE COLOR"
    np.testing.assert_array_equal(image.pixels, expected)


def test_declared_size_beyond_the_limit_is_refused_before_decoding():
    """A tiny RLE/JPEG payload can declare gigabytes; the header is checked before decoding."""
    ds = make_cr_dataset(rows=64, columns=48)
    ds.Rows, ds.Columns = 10_000, 10_000  # 100 MP declared, 6 kB of pixel data present
    with pytest.raises(UndecodablePixelDataError, match="megapixel limit"):
        image_from_dataset(ds)
