"""Question/answer pairs, one concern a file: reading records (files), the prompt template (template), token
rows with the loss mask and the length limit (rows), and token-length statistics (lengths). The data module that
batches them is gptft.data.instruct.InstructPairs."""
