// The command loop of the harnesses (read_session.mjs, vercel_chat.mjs): one JSON command a line on stdin, carried
// out one at a time in the order they came; each is answered by a {"kind":"result","cmd":...} line on stdout,
// unless its handler returns null (it ended the process).
//
//   serveCommands(command, failure, echo)
//     command(request) -> answer object | null    (may be async; may throw)
//     failure(error)   -> answer object            (for a command that threw)
//     echo(request)    -> fields added to every result line (default none)

import { createInterface } from "node:readline";

export function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

export function serveCommands(command, failure, echo = () => ({})) {
  let commands = Promise.resolve();
  createInterface({ input: process.stdin }).on("line", (line) => {
    if (!line.trim()) return;
    const request = JSON.parse(line);
    commands = commands.then(async () => {
      let answer;
      try {
        answer = await command(request);
      } catch (error) {
        answer = failure(error);
      }
      if (answer !== null) emit({ kind: "result", cmd: request.cmd, ...echo(request), ...answer });
    });
  });
}
