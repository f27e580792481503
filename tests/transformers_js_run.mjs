// Loads an ONNX export with transformers.js (local files only, default options) and prints, as one JSON
// line: the tokenizer's ids for `texts`, the model's logits for `decoder_input_ids`, the greedy replies
// for `input_ids` with the `generate` settings, and the replies' text.
//   node transformers_js_run.mjs MODEL_FOLDER REQUEST_JSON     (TRANSFORMERS_JS_HOME: a folder whose
//   node_modules holds @huggingface/transformers)
import { createRequire } from 'node:module';
import path from 'node:path';

const [folder, requestJson] = process.argv.slice(2);
const request = JSON.parse(requestJson);
const require = createRequire(path.join(process.env.TRANSFORMERS_JS_HOME, 'package.json'));
const { env, AutoModelForSeq2SeqLM, AutoTokenizer, Tensor } = require('@huggingface/transformers');

env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder);
const name = path.basename(folder);

// int64 tensor [rows, columns] from a list of equal-length rows
const ids = (rows) => new Tensor('int64', BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0].length]);
const numbers = (tensor) => tensor.tolist().map((row) => row.map(Number));

const tokenizer = await AutoTokenizer.from_pretrained(name);
const model = await AutoModelForSeq2SeqLM.from_pretrained(name);
const encoded = request.texts.map((text) => Array.from(tokenizer.encode(text)));
const input_ids = ids(request.input_ids);
const attention_mask = ids(request.attention_mask);
const { logits } = await model({ input_ids, attention_mask, decoder_input_ids: ids(request.decoder_input_ids) });
const replies = numbers(await model.generate({ input_ids, attention_mask, ...request.generate }));
console.log(JSON.stringify({
  encoded,
  logits: { dims: logits.dims, data: Array.from(logits.data) },
  replies,
  texts: tokenizer.batch_decode(replies, { skip_special_tokens: true }),
}));
