"""Instructions per ``ChunkReader.read`` of one text chunk, or of one tool
call's argument chunk with ``tool`` (the direct route's parsed JSON), for a
tree: run it under callgrind with N reads and with none, the difference
over N is one read's count, which other processes' load does not change
(branch ``refusal``, bench/README.md):

    for n in 0 20000; do PYTHONHASHSEED=0 valgrind --tool=callgrind \
        --callgrind-out-file=/dev/null .venv/bin/python bench/chunk_reader_ir.py TREE $n [tool] \
        2>&1 | grep -o "Collected : [0-9]*"; done
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, sys.argv[1])

from app.llm.provider import ChunkReader  # from the tree given first

TEXT = '{"content":" world"}'
TOOL = '{"tool_calls":[{"index":0,"function":{"arguments":" world"}}]}'
DELTA = TOOL if sys.argv[3:] == ["tool"] else TEXT
CHUNK = json.loads(
    '{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m",'
    f'"choices":[{{"index":0,"delta":{DELTA},"finish_reason":null}}]}}'
)


def main(reads: int) -> None:
    reader = ChunkReader()
    for _ in range(reads):
        for _event in reader.read(CHUNK):
            pass
        reader.output.clear()


if __name__ == "__main__":
    main(int(sys.argv[2]))
