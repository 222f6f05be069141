// The Node SDK's structured outputs against the agent: `zodResponseFormat` with `chat.completions.parse`.
// Usage: node zod_parse.mjs BASE_URL MODEL. Prints one JSON line: the parsed object and the finish reason.
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });

const City = z.object({
  name: z.string().max(40),
  country: z.string().max(40),
  population: z.number().int().min(0),
  landmarks: z.array(z.enum(["museum", "tower", "bridge", "park"])).min(1).max(3),
});

const completion = await client.chat.completions.parse({
  model,
  messages: [{ role: "user", content: "Describe Paris as JSON." }],
  response_format: zodResponseFormat(City, "city"),
  temperature: 1.0,
  seed: 3,
  max_completion_tokens: 200,
});
const choice = completion.choices[0];
// parse() validated the content against the zod schema; re-check it here so a lax parser cannot hide a mismatch.
const checked = City.parse(JSON.parse(choice.message.content));
console.log(JSON.stringify({ parsed: choice.message.parsed, checked, finish_reason: choice.finish_reason }));
