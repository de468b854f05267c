"""lastbit: squeeze a trained model and compile it to fast low-bit code for a target triple."""
