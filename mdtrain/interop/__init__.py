"""Moving weights in and out of mdtrain: MDLM reference checkpoints and Hugging Face causal LMs become mdtrain
export directories (``mdtrain import``); runs become Hugging Face directories ``transformers`` loads
(``mdtrain export --format hf``). Nothing read from disk here executes code (``interop.safeload``)."""
