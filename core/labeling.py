"""The Label Studio side of the contract: labeling config, control names and task-data keys.

The importer writes tasks with these keys, the backend reads prompts from these controls,
the exporter reads brush results from ``BRUSH_CONTROL``. Change them here only.
"""

from __future__ import annotations

IMAGE_KEY = "image"
BRUSH_CONTROL = "tumor"
BOX_CONTROL = "box"
POINT_CONTROL = "point"
REVIEW_CONTROL = "review"
TUMOR_LABEL = "Tumor"
EDEMA_LABEL = "Edema"
BACKGROUND_LABEL = "Background"
REVIEWED_CHOICE = "Reviewed"
TISSUE_CLASSES = ("Fibrous", "Fat", "Myxoid", "Nerve", "Vascular", "unknown")
TASK_DATA_KEYS = (
    "image", "patient_id", "case_id", "modality", "tumor_type", "tissue", "anatomy",
    "slice_index", "n_slices", "instance_number", "annotate_on",
)

LABEL_CONFIG = f"""<View>
  <Header value="$patient_id · $modality · slice $slice_index / $n_slices"/>
  <Image name="{IMAGE_KEY}" value="${IMAGE_KEY}" zoom="true" zoomControl="true"
         brightnessControl="true" contrastControl="true" rotateControl="false"/>
  <BrushLabels name="{BRUSH_CONTROL}" toName="{IMAGE_KEY}">
    <Label value="{TUMOR_LABEL}" background="#ff3b30"/>
    <Label value="{EDEMA_LABEL}" background="#ffcc00"/>
  </BrushLabels>
  <RectangleLabels name="{BOX_CONTROL}" toName="{IMAGE_KEY}" smart="true" smartOnly="true" showInline="true">
    <Label value="{TUMOR_LABEL}" background="#0a84ff"/>
  </RectangleLabels>
  <KeyPointLabels name="{POINT_CONTROL}" toName="{IMAGE_KEY}" smart="true" smartOnly="true" showInline="true">
    <Label value="{TUMOR_LABEL}" background="#30d158"/>
    <Label value="{BACKGROUND_LABEL}" background="#8e8e93"/>
  </KeyPointLabels>
  <Choices name="{REVIEW_CONTROL}" toName="{IMAGE_KEY}" choice="single" showInline="true">
    <Choice value="{REVIEWED_CHOICE}"/>
    <Choice value="Needs revision"/>
  </Choices>
</View>
"""


def roi_label(roi: str) -> str:
    """The brush label an imported ROI is shown with (oedema ROIs as Edema, the rest as Tumor)."""
    lowered = roi.lower()
    return EDEMA_LABEL if "edema" in lowered or "oedema" in lowered else TUMOR_LABEL


def annotate_on(tissue: str | None) -> str:
    """The modality the protocol prefers: T1 shows fatty tumours best, T2 fat-sat the rest."""
    return "T1" if (tissue or "").strip().lower() == "fat" else "T2"
