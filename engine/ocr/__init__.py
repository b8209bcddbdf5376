"""engine.ocr: the offline OCR engine (RapidOCR's PP-OCRv4 models on onnxruntime).

- engine.py — `OcrEngine` (`engine=ocr`): answers with the text found in the images;
- reader.py — reading the text lines of one decoded image;
- hints.py — `OcrHintedEngine`: the VLM's prompt also carries the text OCR read.

May import: engine.intake, bot.models and bot.engine_port; another engine only through the
Engine port (hints.py wraps whichever VLM engine it is given).
"""
