"""Evaluation of RadVLM-style models: run a model over a test split, score its answers the way
upstream RadVLM scored them (design §5), and write a report beside the paper's numbers.

Modules:
- ``records``        – the test-split and prediction record shapes, task names, task inference;
- ``runner``         – ``run_evaluation``: model over a split, resumable JSONL of raw answers;
- ``grounding``      – mAP exactly as upstream ``evaluate_boxes``, COCO-style (pycocotools), IoU;
- ``classification`` – per-label / macro / micro F1 under the upstream substring rule and ours;
- ``report``         – ROUGE-L, BERTScore, RadGraph F1, GREEN (model-backed ones optional);
- ``judge``          – the paper's LLM-judge for conversations over an OpenAI-compatible API;
- ``baselines``      – prompt adapters for the models the paper compared;
- ``report_writer`` / ``plots`` – Markdown + JSON results beside the paper's, PNG figures;
- ``cli``            – ``radvlm evaluate``.

Heavy optional packages (scikit-learn, pycocotools, rouge_score, matplotlib: the ``eval``
extra; bert-score, radgraph, green_score: never required) are imported where they are used, so
``radvlm`` itself starts without them.
"""
