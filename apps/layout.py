"""The page: four tabs of gradio components wired to `apps.ui.App`'s handlers (imported only with gradio).

Element ids (elem_id) are the names the browser test and any user script can rely on: train-*, gen-*, edit-*,
emb-*.
"""

from __future__ import annotations

import gradio as gr

# small models draw small images (the shapes model: 32 px): show them scaled up, pixels kept sharp
CSS = """
#train-grid img, #gen-gallery img, #edit-gallery img, #edit-image-view img, #edit-mask-view img {
  image-rendering: pixelated; }
#train-grid img, #edit-image-view img, #edit-mask-view img { width: 100%; height: 100%; object-fit: contain; }
"""


def layout(app, defaults: dict) -> gr.Blocks:
    ws = app.ws
    models = ws.models()
    first_model = models[0][1] if models else None
    # uploads wait in gradio's temporary folder until they are checked and kept: cleared hourly after a day
    with gr.Blocks(title="oneword", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## oneword — teach a new word from a few pictures, then use it in prompts")
        loaded = gr.State([])  # this tab's embedding files for Generate
        seen = gr.State({})  # what this tab has drawn of the training job
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=2):
                        model = gr.Dropdown(
                            models,
                            value=first_model,
                            allow_custom_value=True,
                            label="Model",
                            info="a checkpoint in weights/, or type a path inside weights/, runs/ or outputs/",
                            elem_id="train-model",
                        )
                        images = gr.File(
                            file_count="multiple",
                            file_types=["image"],
                            elem_id="train-images",
                            label="Concept images: drop 3–20 (jpg, png, webp)",
                        )
                        concept = gr.Dropdown(
                            ws.concepts(),
                            value=None,
                            allow_custom_value=True,
                            label="…or a concept folder",
                            elem_id="train-concept",
                            info="used when no images are dropped",
                        )
                        with gr.Row():
                            token = gr.Textbox(defaults["token"], label="New word", elem_id="train-token")
                            init = gr.Textbox(
                                defaults["init"],
                                label="Init word",
                                elem_id="train-init",
                                info="one existing word close to the concept",
                            )
                            steps = gr.Textbox(defaults["steps"], label="Steps", elem_id="train-steps")
                        with gr.Accordion("More options", open=False):
                            save_every = gr.Number(
                                defaults["save_every"],
                                precision=0,
                                minimum=1,
                                label="Save and draw a validation grid every N steps",
                                elem_id="train-save-every",
                            )
                            vectors = gr.Number(
                                1, precision=0, minimum=1, maximum=75, label="Vectors per word", elem_id="train-vectors"
                            )
                        with gr.Row():
                            start = gr.Button("Start", variant="primary", elem_id="train-start")
                            stop = gr.Button("Stop (saves)", variant="stop", elem_id="train-stop", interactive=False)
                        with gr.Row():
                            resume_run = gr.Dropdown(
                                app.run_choices(),
                                value=None,
                                allow_custom_value=True,
                                label="Run to resume",
                                elem_id="train-run",
                                scale=3,
                            )
                            resume = gr.Button("Resume", elem_id="train-resume", scale=1)
                        message = gr.Markdown(elem_id="train-message")
                    with gr.Column(scale=3):
                        status = gr.Markdown("**no training job yet**", elem_id="train-status")
                        plot = gr.LinePlot(x="step", y="loss", label="loss", height=260, elem_id="train-plot")
                        grid = gr.Image(
                            label="validation grid",
                            type="filepath",
                            interactive=False,
                            elem_id="train-grid",
                            height=260,
                        )
                        with gr.Accordion("Trainer output", open=False):
                            output = gr.Textbox(lines=10, max_lines=10, show_label=False, elem_id="train-log")
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        gen_model = gr.Dropdown(
                            models, value=first_model, allow_custom_value=True, label="Model", elem_id="gen-model"
                        )
                        words = gr.Markdown("No learned words loaded (Embeddings tab).", elem_id="gen-words")
                        with gr.Row():
                            word = gr.Dropdown([], value=None, label="Learned word", elem_id="gen-word", scale=3)
                            insert = gr.Button("Insert into prompt", elem_id="gen-insert", scale=1)
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                        negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
                        with gr.Row():
                            sampler = gr.Dropdown(
                                defaults["samplers"], value="ddim", label="Sampler", elem_id="gen-sampler"
                            )
                            gen_steps = gr.Textbox("", label="Steps", placeholder="the model's", elem_id="gen-steps")
                            scale = gr.Textbox(
                                "", label="Guidance scale", placeholder="the model's", elem_id="gen-scale"
                            )
                        with gr.Row():
                            seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="gen-seed")
                            count = gr.Slider(
                                1, defaults["max_count"], value=4, step=1, label="Count", elem_id="gen-count"
                            )
                        go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                        gen_message = gr.Markdown(elem_id="gen-message")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(
                            label="Images (each with its parameters)",
                            columns=4,
                            format="png",
                            elem_id="gen-gallery",
                            height=520,
                        )
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column(scale=2):
                        edit_using = gr.Markdown(elem_id="edit-using")
                        with gr.Row():
                            edit_image = gr.File(file_types=["image"], label="Image to edit", elem_id="edit-image")
                            edit_mask = gr.File(
                                file_types=["image"], label="Mask (optional): white = edit", elem_id="edit-mask"
                            )
                        with gr.Row():
                            image_view = gr.Image(
                                label="image", type="filepath", interactive=False, height=160, elem_id="edit-image-view"
                            )
                            mask_view = gr.Image(
                                label="mask", type="filepath", interactive=False, height=160, elem_id="edit-mask-view"
                            )
                        with gr.Row():
                            edit_word = gr.Dropdown([], value=None, label="Learned word", elem_id="edit-word", scale=3)
                            edit_insert = gr.Button("Insert into prompt", elem_id="edit-insert", scale=1)
                        edit_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="edit-prompt")
                        edit_negative = gr.Textbox(label="Negative prompt", elem_id="edit-negative")
                        with gr.Row():
                            strength = gr.Slider(
                                0,
                                1,
                                value=defaults["strength"],
                                step=0.05,
                                label="Strength (1 = from pure noise)",
                                elem_id="edit-strength",
                            )
                            mask_blur = gr.Number(
                                defaults["mask_blur"],
                                precision=0,
                                minimum=0,
                                label="Mask blur (px)",
                                elem_id="edit-mask-blur",
                            )
                        with gr.Row():
                            edit_sampler = gr.Dropdown(
                                defaults["samplers"], value="ddim", label="Sampler", elem_id="edit-sampler"
                            )
                            edit_steps = gr.Textbox("", label="Steps", placeholder="the model's", elem_id="edit-steps")
                            edit_scale = gr.Textbox(
                                "", label="Guidance scale", placeholder="the model's", elem_id="edit-scale"
                            )
                        with gr.Row():
                            edit_seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="edit-seed")
                            edit_count = gr.Slider(
                                1, defaults["max_count"], value=4, step=1, label="Count", elem_id="edit-count"
                            )
                        edit_go = gr.Button("Edit", variant="primary", elem_id="edit-go")
                        edit_message = gr.Markdown(elem_id="edit-message")
                    with gr.Column(scale=3):
                        edit_gallery = gr.Gallery(
                            label="Edited images (each with its parameters)",
                            columns=4,
                            format="png",
                            elem_id="edit-gallery",
                            height=520,
                        )
            with gr.Tab("Embeddings", id="embeddings") as embeddings_tab:
                table = gr.Dataframe(
                    headers=["file", "words", "width", "trained on"], interactive=False, wrap=True, elem_id="emb-table"
                )
                with gr.Row():
                    pick = gr.Dropdown(
                        [], value=None, allow_custom_value=True, label="Embedding file", elem_id="emb-pick", scale=3
                    )
                    refresh = gr.Button("Refresh", elem_id="emb-refresh", scale=1)
                with gr.Row():
                    load = gr.Button("Load into Generate", variant="primary", elem_id="emb-load")
                    download = gr.DownloadButton(
                        "Download learned_embeds.safetensors", interactive=False, elem_id="emb-download"
                    )
                upload = gr.File(
                    label="Add an embedding file (official, diffusers, AUTOMATIC1111 or kohya)",
                    file_types=[".pt", ".safetensors", ".bin"],
                    elem_id="emb-upload",
                )
                emb_message = gr.Markdown(elem_id="emb-message")

        timer = gr.Timer(defaults["poll"])
        timer.tick(
            app.poll,
            [seen],
            [status, plot, grid, output, resume_run, start, stop, resume, seen],
            show_progress="hidden",
            queue=False,
        )
        images.upload(app.check_uploads, [images], [message], show_progress="hidden")
        images.clear(lambda: "", None, [message], show_progress="hidden")
        start.click(app.start, [model, images, concept, token, init, steps, save_every, vectors], [message])
        stop.click(app.stop, None, [message])
        resume.click(app.resume, [resume_run, steps, save_every], [message])

        insert.click(app.insert, [prompt, word], [prompt])
        go.click(
            app.generate,
            [gen_model, loaded, prompt, negative, sampler, gen_steps, scale, seed, count],
            [gallery, gen_message],
        )

        edit_image.upload(
            lambda f: app.edit_upload(f, "image"), [edit_image], [image_view, edit_message], show_progress="hidden"
        )
        edit_mask.upload(
            lambda f: app.edit_upload(f, "mask"), [edit_mask], [mask_view, edit_message], show_progress="hidden"
        )
        edit_image.clear(lambda: (None, ""), None, [image_view, edit_message], show_progress="hidden")
        edit_mask.clear(lambda: (None, ""), None, [mask_view, edit_message], show_progress="hidden")
        edit_insert.click(app.insert, [edit_prompt, edit_word], [edit_prompt])
        edit_go.click(
            app.edit,
            [
                gen_model,
                loaded,
                edit_image,
                edit_mask,
                edit_prompt,
                edit_negative,
                strength,
                edit_sampler,
                edit_steps,
                edit_scale,
                edit_seed,
                edit_count,
                mask_blur,
            ],
            [edit_gallery, edit_message],
        )
        gen_model.change(app.edit_view, [gen_model, loaded], [edit_using, edit_word], show_progress="hidden")

        def refresh_embeddings():
            return app.table(), app.embedding_choices()

        refresh.click(refresh_embeddings, None, [table, pick])
        embeddings_tab.select(refresh_embeddings, None, [table, pick])
        pick.change(app.download, [pick], [download])
        load.click(app.load_word, [pick, loaded, gen_model], [loaded, words, word, gen_model, emb_message]).then(
            app.edit_view, [gen_model, loaded], [edit_using, edit_word], show_progress="hidden"
        )
        upload.upload(app.add_file, [upload], [table, pick, emb_message])

        def refresh_lists():
            models = gr.update(choices=ws.models())
            return (
                models,
                models,
                gr.update(choices=ws.concepts()),
                gr.update(choices=app.run_choices()),
                *refresh_embeddings(),
            )

        demo.load(refresh_lists, None, [model, gen_model, concept, resume_run, table, pick]).then(
            app.edit_view, [gen_model, loaded], [edit_using, edit_word], show_progress="hidden"
        )
    return demo
