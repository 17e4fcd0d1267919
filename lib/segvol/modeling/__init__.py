"""Network modules, laid out like Segment Anything's: image encoder, prompt encoder, mask decoder (+ text)."""
