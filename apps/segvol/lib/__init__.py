"""The SegVol MONAI Label app's own modules (MONAI Label imports them as `lib` from the app folder)."""
